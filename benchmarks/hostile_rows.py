"""Peak RSS and wall time of `ft data check` on one giant row (20 MB and 200 MB), in a JSON array and JSONL.

    python benchmarks/hostile_rows.py                          # prints the figures as JSON
    python benchmarks/hostile_rows.py --sizes-mb 20 --out rows.json

Each file holds ten ordinary chat rows and one row whose user turn is SIZE MB of ordinary words, written
in chunks (never held whole). Every measurement is a fresh process running `ft data check` on the `tiny`
recipe (its tokenizer is a byte-level BPE like the real models') with train.max_seq_length 2048, and
reports its own peak RSS, so each figure is that one check's alone. Two settings are measured:

    default   data.max_row_chars as shipped: the giant row is refused with file:line before tokenising
    raised    data.max_row_chars=1e9: the row goes through the length statistics (drop policy), which
              tokenise only a prefix of it

A JSONL line over 64 MiB is refused by the reader before either limit applies (the rest of the file is
not read). With `--only default` it also runs against code from before data.max_row_chars existed
(point PYTHONPATH at such a checkout); issue 9 reported 4.3 GB / 44 s (20 MB) and 12 GB (200 MB) then.

Recorded 2026-12-01 on the 2-core CPU development machine (Python 3.11.7, transformers 5.17.0; other
jobs shared the CPU, so wall times are loose), train.max_seq_length 2048. Peak RSS of the whole process;
`ft data check` on a 10-row file peaks at 398 MiB (imports and tokenizer). "before" is the code of
issue 9's report (no data.max_row_chars, whole rows tokenised), run with PYTHONPATH:

    row     layout  before            default limit (refused)    limit raised (prefix tokenised)
    20 MB   json    4,303 MiB, 111 s    79 MiB,  1.7 s             477 MiB, 15 s
    20 MB   jsonl   4,303 MiB, 185 s    99 MiB,  0.9 s             477 MiB, 14 s
    200 MB  json    12 GB (issue)      439 MiB,  4.4 s             997 MiB, 49 s
    200 MB  jsonl   -                  168 MiB,  0.6 s (the 64 MiB line cap refuses it, either setting)

Refused rows never load transformers, hence the small figures. With the limit raised, what is left is
holding the row itself a few times (file bytes, decoded text, parsed row, rendered chat text); a split
of the prompt into words for the leakage key once cost another 20x the row and now goes a chunk at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "by",
    "at",
    "this",
    "from",
    "or",
    "an",
    "are",
    "which",
]
CHILD = """
import json, os, resource, sys, time
started = time.perf_counter()
from ft.cli import main
code = main(sys.argv[1:])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
with open(os.environ["FT_BENCH_OUT"], "w") as f:
    json.dump({"exit": code, "peak_rss_mib": round(peak, 1), "wall_s": round(time.perf_counter() - started, 2)}, f)
"""


def _chunk(rng: random.Random, size: int = 1 << 20) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(size // 3))
    return text[:size]


def _normal_rows(n: int = 10) -> list[str]:
    return [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"question {i}"},
                    {"role": "assistant", "content": f"answer {i}"},
                ]
            }
        )
        for i in range(n)
    ]


def write_file(path: Path, size_mb: int, layout: str, seed: int = 0) -> int:
    """One giant row (first) and ten small ones, as a JSON array or JSON Lines."""
    chunk = _chunk(random.Random(seed))
    head = '{"messages": [{"role": "user", "content": "'
    tail = '"}, {"role": "assistant", "content": "ok"}]}'
    rows = _normal_rows()
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n" if layout == "json" else "")
        f.write(head)
        left = size_mb << 20
        while left > 0:
            f.write(chunk[:left])
            left -= len(chunk)
        f.write(tail)
        sep = ",\n" if layout == "json" else "\n"
        for row in rows:
            f.write(sep + row)
        f.write("\n]\n" if layout == "json" else "\n")
    return path.stat().st_size


def measure_once(path: Path, setting: str, max_seq_length: int, work: Path) -> dict:
    argv = ["data", "check", "--recipe", "tiny", "--train", str(path)]
    overrides = ["data.label_field=null", "data.labels=null", f"train.max_seq_length={max_seq_length}"]
    if setting == "raised":
        overrides.append("data.max_row_chars=1000000000")
    for item in overrides:
        argv += ["--set", item]
    out = work / "figures.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, "FT_BENCH_OUT": str(out), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, env=env, cwd=work, timeout=3600
    )
    figures = json.loads(out.read_text()) if out.is_file() else {"exit": done.returncode, "crashed": True}
    lines = (done.stderr.strip() or done.stdout.strip()).splitlines()
    figures["said"] = lines[-1][:200] if done.stderr.strip() else lines[0][:200] if lines else ""
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--layouts", nargs="+", default=["json", "jsonl"], choices=["json", "jsonl"])
    parser.add_argument("--only", choices=["default", "raised"], help="measure one setting only")
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    settings = [args.only] if args.only else ["default", "raised"]

    results = []
    with tempfile.TemporaryDirectory(prefix="ft-hostile-") as tmp:
        work = Path(tmp)
        small = work / "small.jsonl"
        small.write_text("\n".join(_normal_rows()) + "\n", encoding="utf-8")
        baseline = measure_once(small, settings[0], args.max_seq_length, work)
        for size_mb in args.sizes_mb:
            for layout in args.layouts:
                path = work / f"row-{size_mb}mb.{layout}"
                file_bytes = write_file(path, size_mb, layout)
                for setting in settings:
                    started = time.perf_counter()
                    figures = measure_once(path, setting, args.max_seq_length, work)
                    print(
                        f"{size_mb} MB {layout} {setting}: {figures} ({time.perf_counter() - started:.0f} s)",
                        file=sys.stderr,
                    )
                    results.append(
                        {
                            "row_mb": size_mb,
                            "layout": layout,
                            "setting": setting,
                            "file_bytes": file_bytes,
                            **figures,
                        }
                    )
                path.unlink()
    report = {
        "max_seq_length": args.max_seq_length,
        "baseline_small_file": baseline,
        "results": results,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
