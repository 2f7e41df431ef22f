"""Peak memory and wall time of the data check and the training-data pipeline on 75,000 chat rows.

    python benchmarks/scale_rss.py                  # prints the figures as JSON
    python benchmarks/scale_rss.py --rows 75000 --out scale.json

The rows come from benchmarks/data_check.py's generator (multi-turn support chats; 4.8M tokens under
the tiny model's small byte-level vocabulary, fewer under a real model's), written to a temporary JSONL
file before anything is measured. Then, in
this one process, the stages `ft train` runs before its first step:

    check     ft.data.check: read, validate, dedupe, render and tokenise for lengths, split
    encode    ft.data.encode.encode on the training split: input ids and assistant-only labels
    dataset   the datasets.Dataset the trainer is given (ft.train._to_dataset)

For each stage: wall time, peak RSS since the baseline, and RSS still held after it. The baseline is
taken after the imports and the tokenizer are loaded, and the rows are written by a child process; on
Linux the high-water mark is reset at the baseline, so the growth is what the data costs.

What the growth is made of: the check keeps every row once, as normalised chat messages (Python strings
and dicts; the file itself is streamed line by line and never held whole); encoding adds two Python
int lists per row (ids and labels, about 40 bytes a token with CPython's boxed ints); the Arrow
dataset then holds them again compactly (8 bytes a token for each int64 column). Nothing holds the
file's text several times over.

Recorded 2026-11-24 on the 2-core CPU development machine (Python 3.11.7, torch 2.13.0+cpu,
transformers 5.17.0, datasets 4.8.5; other jobs shared the CPU), 75,000 rows, 18.8 MiB of JSONL,
4.77M tokens under the tiny tokenizer; baseline 344 MiB:

    stage     wall     peak RSS   growth
    check      5.9 s   468 MiB    +124 MiB
    encode     9.4 s   655 MiB    +186 MiB
    dataset    1.5 s   892 MiB    +237 MiB
    total     16.8 s   892 MiB    +547 MiB   (before the dataset was given a fingerprint: +863 MiB)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing


def peak_rss_mib() -> float:
    """The high-water RSS since the last `reset_peak_rss`, else since the process started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1)


def reset_peak_rss() -> bool:
    """Start the high-water mark again from the current RSS (Linux >= 4.0), so that what came before
    the baseline -- imports, loading the tokenizer -- cannot hide a stage's peak (ru_maxrss never falls)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def write_rows_in_a_child(path: Path, rows: int, seed: int) -> int:
    """Generate the rows in another process: whatever the generator holds is not this one's peak."""
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('gen', sys.argv[1])\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(m.write_rows(__import__('pathlib').Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(HERE / "data_check.py"), str(path), str(rows), str(seed)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.strip().splitlines()[-1])


def current_rss_mib() -> float | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def measure(rows: int, seed: int, max_seq_length: int) -> dict:
    from ft.config import load_settings
    from ft.data import check
    from ft.data.encode import encode
    from ft.modelref import load_tokenizer
    from ft.train import _to_dataset

    stages: dict[str, dict] = {}

    def stage(name: str, started: float, **extra) -> None:
        stages[name] = {
            "wall_s": round(time.perf_counter() - started, 2),
            "peak_rss_mib": peak_rss_mib(),
            "rss_after_mib": current_rss_mib(),
            **extra,
        }

    with tempfile.TemporaryDirectory(prefix="ft-scale-") as tmp:
        path = Path(tmp) / "chat.jsonl"
        size = write_rows_in_a_child(path, rows, seed)
        settings = load_settings(
            "tiny",
            [
                f"data.train={json.dumps([str(path)])}",
                "data.label_field=null",
                "data.labels=null",
                f"train.max_seq_length={max_seq_length}",
            ],
        )
        tokenizer = load_tokenizer(settings.model.name_or_path)
        baseline = {"peak_rss_mib": peak_rss_mib(), "rss_mib": current_rss_mib()}
        baseline["peak_reset"] = reset_peak_rss()

        started = time.perf_counter()
        result = check(settings, tokenizer=tokenizer)
        report = result.report
        stage("check", started, rows_kept=report["rows"]["train"] + report["rows"]["eval"])

        started = time.perf_counter()
        encoded = encode(result.train, tokenizer, settings.train.max_seq_length, settings.data.too_long)
        tokens = sum(len(r["input_ids"]) for r in encoded)
        stage("encode", started, rows=len(encoded), tokens=tokens)

        started = time.perf_counter()
        dataset = _to_dataset(encoded, "scale-benchmark")
        stage("dataset", started, rows=len(dataset))

    peak = max(s["peak_rss_mib"] for s in stages.values())
    return {
        "rows": rows,
        "file_mib": round(size / 2**20, 1),
        "tokens_total": report["tokens"]["total"],
        "baseline": baseline,
        "stages": stages,
        "wall_s": round(sum(s["wall_s"] for s in stages.values()), 2),
        "peak_rss_mib": peak,
        # Over the RSS held at the baseline (writing the rows may have left a higher peak behind).
        "peak_growth_mib": round(peak - (baseline["rss_mib"] or baseline["peak_rss_mib"]), 1),
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
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    figures = measure(args.rows, args.seed, args.max_seq_length)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
