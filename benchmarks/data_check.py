"""Benchmark `ft data check` on 75,000 generated multi-turn chat rows (the issue's "real size").

    python benchmarks/data_check.py                 # prints the figures as JSON
    python benchmarks/data_check.py --out bench.json --rows 75000

It writes the rows to a temporary JSONL file (streamed, never held whole), loads the tokenizer once
(its load time is reported apart), then times `ft.data.check` on the file and reports wall time,
rows/s, tokens/s (tokens counted by the check under the model's tokenizer and chat template) and the
process's peak RSS. Run it on the target machine; the budget is 60 s for 75,000 rows / ~3M tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ft.testing import CATEGORIES, CITIES, NAMES, SYSTEM_PROMPT  # noqa: E402

FOLLOW_UPS = ["Which team handles this?", "What should I do next?", "Anything else you need?"]
REPLIES = [
    "The {category} team; they reply within a day.",
    "Nothing else, {name}; wait for the {category} team.",
]
COMPLAINTS = [(category, text) for category, texts in CATEGORIES.items() for text in texts]


def chat_row(index: int, rng: random.Random) -> dict:
    """One support conversation; `index` picks a distinct (name, city, branch, complaint) so rows are unique.

    Most rows are one exchange, some carry the system prompt, and some go on for a second or third
    exchange, so the mix has realistic variety while totalling about 3 million tokens for 75,000 rows.
    """
    index, name = divmod(index, len(NAMES))
    index, city = divmod(index, len(CITIES))
    index, branch = divmod(index, len(CITIES))
    ticket, complaint = divmod(index, len(COMPLAINTS))
    category, complaint = COMPLAINTS[complaint]
    name, city, branch = NAMES[name], CITIES[city], CITIES[branch]
    where = f"{city} ({branch})" if not ticket else f"{city} ({branch}, #{ticket})"
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.1 else []
    messages += [
        {"role": "user", "content": f"From {name} in {where}: {complaint}."},
        {"role": "assistant", "content": json.dumps({"name": name, "city": city, "category": category})},
    ]
    for _ in range(rng.choice((0,) * 8 + (1, 2))):
        messages.append({"role": "user", "content": rng.choice(FOLLOW_UPS)})
        messages.append(
            {"role": "assistant", "content": rng.choice(REPLIES).format(name=name, category=category)}
        )
    return {"messages": messages}


def write_rows(path: Path, n: int, seed: int) -> int:
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)  # unique rows, in no particular order
    with open(path, "w", encoding="utf-8") as f:
        for index in order:
            f.write(json.dumps(chat_row(index, rng)) + "\n")
    return path.stat().st_size


def peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1)


def time_encode(result, tokenizer, settings) -> dict:
    """Labels for the training split, as `ft train` builds them (assistant-only loss)."""
    from ft.data.encode import encode

    started = time.perf_counter()
    rows = encode(result.train, tokenizer, settings.train.max_seq_length, settings.data.too_long)
    wall = time.perf_counter() - started
    tokens = sum(len(r["input_ids"]) for r in rows)
    return {
        "rows": len(rows),
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall),
        "labelled_tokens": sum(1 for r in rows for label in r["labels"] if label != -100),
        "peak_rss_mib": peak_rss_mib(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=75_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model", default="builtin:tiny-qwen2", help="model whose tokenizer measures lengths"
    )
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument(
        "--encode", action="store_true", help="also time ft.data.encode (the training rows) afterwards"
    )
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    from ft.config import load_settings
    from ft.data import check
    from ft.modelref import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="ft-bench-") as tmp:
        path = Path(tmp) / "chat.jsonl"
        size = write_rows(path, args.rows, args.seed)
        settings = load_settings(
            "tiny",
            [
                f"data.train={json.dumps([str(path)])}",
                "data.label_field=null",
                "data.labels=null",
                f"model.name_or_path={args.model}",
                f"train.max_seq_length={args.max_seq_length}",
            ],
        )
        started = time.perf_counter()
        tokenizer = load_tokenizer(settings.model.name_or_path)
        load_s = time.perf_counter() - started
        rss_before = peak_rss_mib()
        started = time.perf_counter()
        result = check(settings, tokenizer=tokenizer)
        wall = time.perf_counter() - started
        rss_after_check = peak_rss_mib()
        encoded = time_encode(result, tokenizer, settings) if args.encode else None
    report = result.report
    tokens = report["tokens"]["total"]
    figures = {
        "rows": args.rows,
        "file_mib": round(size / 2**20, 1),
        "tokens_total": tokens,
        "tokens_per_row": report["tokens"]["mean"],
        "tokens_p50_p99_max": [report["tokens"]["p50"], report["tokens"]["p99"], report["tokens"]["max"]],
        "kept": {"train": report["rows"]["train"], "eval": report["rows"]["eval"]},
        "duplicates": report["duplicates"]["count"],
        "check_wall_s": round(wall, 2),
        "rows_per_s": round(args.rows / wall),
        "tokens_per_s": round(tokens / wall),
        "tokenizer_load_s": round(load_s, 2),
        "peak_rss_mib_before_check": rss_before,
        "peak_rss_mib": rss_after_check,
        "budget_s": 60,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "(unset)"),
    }
    if encoded:
        figures["encode"] = encoded
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
