"""`ft size`'s predictions for every built-in recipe on three GPUs: the README's "Recipes for real jobs" table.

Predictions, not measurements: peak memory, the largest micro-batch that fits and the wall time come
from ft's sizing model (ft/sizing), from the built-in shapes of the models (no download, no GPU). Each
recipe is sized on the data its header's `ft size` line states (`--rows/--tokens`, e.g. voice-3b's full
75,000 records), else on the files it names, with every row taken at max_seq_length (an upper bound,
marked "<="). Recipes with `train.backend: auto` get a row for each backend it may pick on a GPU.

    python benchmarks/recipe_sizes.py            # print the table
    python benchmarks/recipe_sizes.py --write    # refresh it in README.md (tests/test_recipes.py checks it)
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the built-in shapes, never a download

from ft import __version__, sizing  # noqa: E402
from ft.config import builtin_recipes, load_settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
START = "<!-- recipe-sizes:start (python benchmarks/recipe_sizes.py --write) -->"
END = "<!-- recipe-sizes:end -->"
GPUS = {"rtx4090": "RTX 4090 (24 GB)", "a100": "A100 (80 GB)", "h100": "H100 SXM (80 GB)"}
SKIP = {"tiny"}  # the CPU smoke recipe: nothing to size on a GPU


def recipes() -> list[str]:
    return sorted(name for name in builtin_recipes() if name not in SKIP)


def stated_size(name: str) -> tuple[str | None, str | None]:
    """--rows/--tokens of the first `ft size --recipe NAME` line in the recipe's header comment."""
    for line in builtin_recipes()[name].read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        found = re.search(rf"ft size --recipe {re.escape(name)}\b[^#]*", line)
        if found:
            args = shlex.split(found.group(0))
            flag = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--rows", "--tokens")}
            return flag.get("--rows"), flag.get("--tokens")
    return None, None


def _backends(settings) -> list[str]:
    return ["unsloth", "hf"] if settings.train.backend == "auto" else [settings.train.backend]


def _cell(report) -> str:
    if not report.fits:
        return "does not fit"
    eta = report.eta
    bound = "<= " if eta.get("tokens_source", "").startswith("upper bound") else "~"
    when = f"{bound}{sizing._duration(eta['seconds'])}" if eta.get("seconds") else "no ETA"
    accum = f" (accumulation {report.grad_accum})" if report.grad_accum and report.grad_accum > 1 else ""
    return f"fits, micro-batch {report.max_micro_batch}{accum}, {when}"


def _data(settings, report, data: dict | None) -> str:
    if data and "mean_tokens" in data:
        source, per_row = "stated in the recipe", f"{data['mean_tokens']:.0f} tokens a row"
    else:
        source, per_row = "the shipped example", f"<= {settings.train.max_seq_length} tokens a row"
    packed = ", packed" if settings.train.packing else ""
    rows, epochs = report.eta["rows"], settings.train.epochs
    return f"{source}: {rows:,.0f} training rows x {epochs:g} epochs, {per_row}{packed}"


def rows() -> list[list[str]]:
    out = []
    for name in recipes():
        s = load_settings(name)
        stated_rows, stated_tokens = stated_size(name)
        data = sizing.stated_data(s, rows=stated_rows, tokens=stated_tokens)
        teaches = re.sub(r"\s*\([^()]*\)$", "", s.description)
        for i, backend in enumerate(_backends(s)):
            reports = [
                sizing.size_report(s, gpu=gpu, data_stats=data, backend=(backend, "the table's"))
                for gpu in GPUS
            ]
            first = i == 0
            out.append(
                [
                    f"`{name}`" if first else "",
                    s.model.name_or_path if first else "",
                    teaches if first else "",
                    _data(s, reports[0], data) if first else "",
                    backend,
                    *(_cell(r) for r in reports),
                ]
            )
    return out


def table() -> str:
    head = ["recipe", "model", "what it teaches", "data sized", "backend", *GPUS.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows()]
    return "\n".join(lines)


def caption() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "ft"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        commit += " with uncommitted changes to ft/" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    return (
        f"*Predictions of `ft size`, not measurements* (ft {__version__}, commit {commit}, {today}; no GPU "
        "involved). ETAs count the rows' own tokens, not padding, at the FLOP utilisation measured for each "
        "backend; `<=` marks an upper bound (every row at max_seq_length)."
    )


def block() -> str:
    return f"{START}\n{caption()}\n\n{table()}\n{END}"


def write_readme() -> None:
    text = README.read_text(encoding="utf-8")
    if START not in text or END not in text:
        sys.exit(f"{README}: no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(head + block() + tail, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="refresh the table in README.md")
    args = parser.parse_args()
    if args.write:
        write_readme()
    print(block())


if __name__ == "__main__":
    main()
