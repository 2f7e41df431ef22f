"""Wall time and peak RSS of the data check on 75,000 rows read as a locally cached Hub dataset.

    python benchmarks/data_scale.py                      # prints the figures as JSON
    python benchmarks/data_scale.py --rows 75000 --tool-share 0.1 --out scale-hub.json

A child process generates the rows (benchmarks/data_check.py's multi-turn support chats, and every
`1 / tool-share`-th row a tool-calling conversation: a `tools` list, an assistant turn with structured
`tool_calls`, the tool's result and the final answer) and writes them into a temporary `datasets`
cache as a Hub download of `bench/support-chats` would leave them. This process then reads
`hf:bench/support-chats` offline through `ft.data.check`, as `ft data check` would: load from the cache,
stream the rows out of Arrow, validate, dedupe, render and tokenise for lengths, split. Before it, the
`stream` stage times the Hub part alone (load from the cache, rows out of Arrow, nulls dropped, rows
hashed). The baseline is taken after the imports and the tokenizer are loaded; on Linux the high-water
mark is reset there (and again between the stages), so the peak growth is what the data costs (the
memory-mapped Arrow pages that were read included).
The issue's budget: 75,000 rows in under 60 s.

Recorded 2026-12-02 on the 2-core CPU development machine while other jobs kept it at a load average of
10-12 (so the walls are several times a quiet machine's: benchmarks/data_check.py's JSONL check of the
same 75,000 plain rows took 38.4 s in the same conditions, against 5.9 s recorded quiet). Python 3.11.7,
datasets 4.8.5, the tiny model's tokenizer; baseline RSS 520 MiB:

    rows                          Arrow     stream           check: wall  peak RSS  growth   tokens
    75,000 plain chats            13.1 MiB  3.6 s  +19 MiB   44.8 s       656 MiB   +136 MiB  4.77M
    75,000, 10% tool-calling      18.7 MiB  4.7 s  +26 MiB   86.2 s       740 MiB   +219 MiB  13.1M
      (data.chat_template qwen2.5: its default system prompt and tool preamble are rendered into every
      row, 2.7x the tokens under the tiny byte-level vocabulary; tokenising them is most of the wall)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))

from scale_rss import current_rss_mib, peak_rss_mib, reset_peak_rss  # noqa: E402

REPO = "bench/support-chats"
COMMIT = "5ca1ab1e" * 5
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "description": "Find an order by customer and city.",
            "parameters": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "city": {"type": "string"}},
                "required": ["name", "city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "open_ticket",
            "description": "Open a ticket with a team.",
            "parameters": {
                "type": "object",
                "properties": {"team": {"type": "string"}, "summary": {"type": "string"}},
                "required": ["team", "summary"],
            },
        },
    },
]


def tool_row(chat: dict, index: int) -> dict:
    """A support chat turned into a tool-calling one: the model looks the order up, then answers."""
    messages = [m for m in chat["messages"] if m["role"] != "system"][:2]
    facts = json.loads(messages[1]["content"])
    call_id = f"call_{index:08d}"
    arguments = json.dumps({"name": facts["name"], "city": facts["city"]})
    return {
        "tools": TOOLS,
        "messages": [
            messages[0],
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": "lookup_order", "arguments": arguments},
                    }
                ],
            },
            {
                "role": "tool",
                "tool_call_id": call_id,
                "name": "lookup_order",
                "content": json.dumps({"order": call_id[5:], "team": facts["category"]}),
            },
            {"role": "assistant", "content": messages[1]["content"]},
        ],
    }


def write_dataset(cache: Path, rows: int, seed: int, tool_share: float) -> dict:
    """In this (child) process: generate the rows and cache them as the Hub dataset `REPO`."""
    import random

    from data_check import chat_row

    from ft.testing import write_cached_hub_dataset

    rng = random.Random(seed)
    order = list(range(rows))
    rng.shuffle(order)
    every = round(1 / tool_share) if tool_share else 0
    data = []
    for n, index in enumerate(order):
        row = chat_row(index, rng)
        data.append(tool_row(row, index) if every and n % every == 0 else row)
    tools = sum("tools" in r for r in data)
    folder = write_cached_hub_dataset(cache, REPO, {"train": data}, COMMIT)
    arrow = sum(p.stat().st_size for p in folder.glob("*.arrow"))
    return {"rows": rows, "tool_rows": tools, "arrow_mib": round(arrow / 2**20, 1)}


def write_in_a_child(cache: Path, rows: int, seed: int, tool_share: float) -> dict:
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "from data_scale import write_dataset\n"
        "from pathlib import Path\n"
        "print(json.dumps(write_dataset(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(cache), str(rows), str(seed), str(tool_share)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(rows: int, seed: int, tool_share: float, max_seq_length: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="ft-hub-scale-") as tmp:
        cache = Path(tmp) / "datasets"
        # `datasets` reads these when it is imported: set them before anything imports it.
        os.environ.update(HF_DATASETS_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        os.environ["HF_HUB_CACHE"] = str(Path(tmp) / "hub")
        started = time.perf_counter()
        written = write_in_a_child(cache, rows, seed, tool_share)
        written["write_s"] = round(time.perf_counter() - started, 1)

        import datasets  # noqa: F401  (its import is part of the baseline, as the tokenizer's is)

        from ft.config import load_settings
        from ft.data import check
        from ft.data.files import Problems
        from ft.data.hub import HubInfo, read_rows
        from ft.modelref import recipe_tokenizer

        settings = load_settings(
            "tiny",
            [
                f"data.train={json.dumps(['hf:' + REPO])}",
                "data.label_field=null",
                "data.labels=null",
                f"train.max_seq_length={max_seq_length}",
                # The tiny model's own ChatML template ignores tools; Qwen2.5's renders them.
                *(["data.chat_template=qwen2.5"] if tool_share else []),
            ],
        )
        tokenizer = recipe_tokenizer(settings)  # with data.chat_template applied
        baseline = {"peak_rss_mib": peak_rss_mib(), "rss_mib": current_rss_mib()}
        baseline["peak_reset"] = reset_peak_rss()

        # The Hub part alone: load from the cache, stream the rows out of Arrow, drop nulls, hash.
        started = time.perf_counter()
        info, problems = HubInfo("train", "hf:" + REPO), Problems()
        streamed = sum(1 for _ in read_rows(info, problems))
        stream = {
            "wall_s": round(time.perf_counter() - started, 2),
            "rows": streamed,
            "peak_growth_mib": round(peak_rss_mib() - (baseline["rss_mib"] or baseline["peak_rss_mib"]), 1),
        }
        reset_peak_rss()

        started = time.perf_counter()
        result = check(settings, tokenizer=tokenizer)
        wall = round(time.perf_counter() - started, 2)
        peak = peak_rss_mib()
        report = result.report

    return {
        "dataset": written,
        "stream": stream,
        "check": {
            "wall_s": wall,
            "rows_per_s": round(rows / wall),
            "peak_rss_mib": peak,
            "peak_growth_mib": round(peak - (baseline["rss_mib"] or baseline["peak_rss_mib"]), 1),
            "rss_after_mib": current_rss_mib(),
            "rows_kept": report["rows"]["train"] + report["rows"]["eval"],
            "tokens_total": report["tokens"]["total"],
            "shapes": report["shapes"],
            "tools": report.get("tools"),
            "revision": report["files"][0].get("revision"),
        },
        "baseline": baseline,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=75_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tool-share", type=float, default=0.1, help="share of tool-calling rows (0: none)")
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    figures = measure(args.rows, args.seed, args.tool_share, args.max_seq_length)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
