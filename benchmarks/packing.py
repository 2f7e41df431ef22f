"""Benchmark `train.packing` on JSON-extraction data: padding share, steps per epoch, CPU tokens/s.

    python benchmarks/packing.py                    # prints the figures as JSON
    python benchmarks/packing.py --out packing.json --rows 5000 --steps 12

Data: the built-in tickets (ft/recipes/data/tickets.jsonl, one short exchange a row) and a larger
synthetic set shaped like it (benchmarks/data_check.py's generator: the same tickets, some with the
system prompt, some going on for a second or third exchange, so lengths vary). Rows are encoded as
`ft train` encodes them (chat template, assistant-only labels) with the tiny model's tokenizer, or
with the tokenizer of a local model directory given by --tokenizer.

Batching figures (no model run): rows batched as the trainer batches them at micro-batch 8 and
effective batch 16, unpacked (each micro-batch padded to its longest row, rows in a seeded random
order) and packed (best-fit into max_seq_length sequences; each micro-batch padded to its longest
packed sequence, the hf backend's layout under sdpa/eager, or flattened without any padding, the
flash-attention and Unsloth layout), at several max_seq_length.

Speed: `ft.train.train` on the tiny model on CPU, `--steps` optimizer steps each way on the synthetic
rows (max_seq_length 512, micro-batch 8 = effective batch), twice each, alternated; real
(non-padding) tokens per second from metrics.jsonl (median over the steps, the first left out as
warm-up). On a shared machine the spread between the rounds says how much load moved the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))

from data_check import chat_row  # noqa: E402

from ft.data import Example  # noqa: E402
from ft.data.encode import encode  # noqa: E402
from ft.train import packing  # noqa: E402

MICRO, EFFECTIVE = 8, 16
SEQ_LENGTHS = (256, 1024, 2048)
ROUNDS = 2


def tickets() -> list[dict]:
    path = HERE.parent / "ft" / "recipes" / "data" / "tickets.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def synthetic(n: int) -> list[dict]:
    rng = random.Random(0)
    return [chat_row(i, rng) for i in range(n)]


def encoded(rows: list[dict], tokenizer, max_len: int) -> list[dict]:
    examples = [Example(r["messages"], "bench.jsonl", i + 1, "messages") for i, r in enumerate(rows)]
    return encode(examples, tokenizer, max_len, "truncate")


def batching(name: str, rows: list[dict], tokenizer) -> dict:
    out: dict = {"rows": len(rows)}
    for seq in SEQ_LENGTHS:
        lengths = [len(r["input_ids"]) for r in encoded(rows, tokenizer, seq)]
        kw = {"micro_batch": MICRO, "effective_batch": EFFECTIVE, "max_seq_length": seq}
        plain = packing.batch_stats(lengths, packing=False, **kw)
        packed = packing.batch_stats(lengths, packing=True, **kw)
        flat = packing.batch_stats(lengths, packing=True, flattened=True, **kw)
        out[f"max_seq_length={seq}"] = {
            "mean_tokens": round(sum(lengths) / len(lengths), 1),
            "max_tokens": max(lengths),
            "unpacked": {k: plain[k] for k in ("steps_per_epoch", "padding_share", "token_slots")},
            "packed": {
                k: packed[k]
                for k in ("sequences", "steps_per_epoch", "padding_share", "token_slots", "mean_fill")
            },
            "packed_flattened_padding_share": flat["padding_share"],
            "lower_bound_sequences": -(-sum(lengths) // seq),
        }
        print(f"{name} @ {seq}: {json.dumps(out[f'max_seq_length={seq}'])}", file=sys.stderr)
    return out


def speed(rows: list[dict], tokenizer, steps: int) -> dict:
    from ft import train as training
    from ft.config import load_settings

    out: dict = {"unpacked": [], "packed": []}
    enc = encoded(rows, tokenizer, 512)
    for pack in (False, True) * ROUNDS:  # alternated, so a change in machine load shows as spread
        settings = load_settings(
            "tiny",
            {
                "train": {
                    "packing": pack,
                    "max_seq_length": 512,
                    "micro_batch": MICRO,
                    "effective_batch": MICRO,
                    "max_steps": steps,
                    "save_every": 10_000,
                },
                "data": {"label_field": None, "labels": None},
            },
        )
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            run_dir.mkdir()
            result = training.train(
                settings,
                run_dir,
                enc,
                [],
                data_sha256="bench",
                device="cpu",
                backend="hf",
                backend_reason="benchmark",
                micro_batch=MICRO,
            )
            metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [m for m in metrics if m.get("kind") == "train" and m["step"] > 1]
        out["packed" if pack else "unpacked"].append(
            {
                "steps": result.steps,
                "real_tokens_per_s_median": round(statistics.median(m["tokens_per_s"] for m in train), 1),
                "real_tokens_per_step_mean": round(statistics.mean(m["tokens_per_step"] for m in train), 1),
                "padding_share_mean": round(statistics.mean(m["padding_share"] for m in train), 4),
                "runtime_s": result.runtime_s,
            }
        )
        print(
            f"speed packing={pack}: {json.dumps(out['packed' if pack else 'unpacked'][-1])}", file=sys.stderr
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000, help="synthetic rows (default 5000)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per speed run (0: skip)")
    parser.add_argument("--tokenizer", help="a local model directory whose tokenizer to use (default: tiny)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    from ft.modelref import load_tokenizer
    from ft.testing import ensure_tiny_model

    tokenizer = load_tokenizer(args.tokenizer or str(ensure_tiny_model()))
    data = {"tickets": tickets(), f"synthetic-{args.rows}": synthetic(args.rows)}
    result = {
        "tokenizer": args.tokenizer or "builtin:tiny-qwen2 (byte-level BPE, 600 tokens)",
        "micro_batch": MICRO,
        "effective_batch": EFFECTIVE,
        "batching": {name: batching(name, rows, tokenizer) for name, rows in data.items()},
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
    }
    if args.steps:
        result["cpu_speed_tiny_model"] = speed(data[f"synthetic-{args.rows}"], tokenizer, args.steps)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
