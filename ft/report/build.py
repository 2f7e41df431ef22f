"""`ft report`: (re)build a run's or bundle's report.html, or compare two of them.

A run directory gets its page at <run>/eval/report.html. A sealed bundle is verified first and never
written into (that would break its MANIFEST): its page goes beside it, <bundle>.report.html.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from ft.errors import FtError
from ft.fsutil import write_text

ARCHIVE = ".tar.gz"


def _open(path: Path, stack: contextlib.ExitStack) -> tuple[Path, Path]:
    """(directory holding the run's files, default page path) for a run directory, bundle or archive."""
    from ft.bundle import open_bundle
    from ft.bundle.identity import MANIFEST

    if path.is_dir() and not (path / MANIFEST).is_file():
        if not (path / "run.json").is_file():
            raise FtError(f"{path}: not an ft run directory or bundle (no run.json, no {MANIFEST})")
        return path, path / "eval" / "report.html"
    if path.is_dir():
        bundle, _ = open_bundle(path)
        return bundle, path.parent / f"{path.name}.report.html"
    if path.is_file():
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ft-report-")))
        bundle, _ = open_bundle(path, tmp / "bundle")
        return bundle, path.parent / f"{path.name.removesuffix(ARCHIVE)}.report.html"
    raise FtError(f"{path}: no such run directory, bundle or archive")


def build(targets: list[Path], out: Path | None = None) -> Path:
    """Write the page for one target, or the comparison page for two; returns the file written."""
    from ft.report.compare import render_compare
    from ft.report.html import load_run, render_run

    if len(targets) not in (1, 2):
        raise FtError(f"ft report takes one run or bundle, or two to compare; got {len(targets)}")
    with contextlib.ExitStack() as stack:
        opened = [_open(Path(t), stack) for t in targets]
        if len(opened) == 1:
            run_dir, default = opened[0]
            return write_text(Path(out) if out else default, render_run(run_dir))
        a, b = (load_run(d) for d, _ in opened)
        names = [str(s["run"].get("name") or s["dir"].name) for s in (a, b)]
        page = Path(out) if out else Path(f"compare-{names[0]}-vs-{names[1]}.html")
        return write_text(page, render_compare(a, b))
