"""report.html in a real browser (`nox -s report`): headless Chromium opens the smoke run's bundled page
and the comparison of two smoke runs with different learning rates; no console message, every chart
drawn, screenshots kept.

Chromium is Debian's `chromium` (`.ci/run` installs it); $FT_CHROMIUM names another binary. Screenshots go
to $FT_REPORT_ARTIFACTS (the nox session sets build/report), else to the test's temporary directory.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_report_html import make_run

pytestmark = pytest.mark.browser

RATES = ("1e-2", "3e-3")  # two smoke runs that differ only in the learning rate


def chromium() -> str:
    found = os.environ.get("FT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("Chromium is not installed (Debian: `apt-get install chromium`; or set FT_CHROMIUM)")
    return found


def ft(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "ft", *args], cwd=cwd, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, f"ft {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module", autouse=True)
def _needs_chromium() -> None:
    chromium()  # skip before training anything when there is no browser


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> dict[str, list[Path]]:
    """Two `ft run --recipe tiny` (the smoke run), sealed; {"runs": [...], "bundles": [...]}."""
    work = tmp_path_factory.mktemp("report-smoke")
    for lr in RATES:
        ft("run", "--recipe", "tiny", "--set", "output.dir=runs", "--set", "output.bundle_dir=bundles",
           "--set", f"train.learning_rate={lr}", cwd=work)  # fmt: skip
    runs = sorted(p for p in (work / "runs").iterdir() if p.is_dir())
    bundles = sorted(p for p in (work / "bundles").iterdir() if p.is_dir())
    assert len(runs) == len(bundles) == 2
    return {"runs": runs, "bundles": bundles}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    out = Path(os.environ.get("FT_REPORT_ARTIFACTS") or tmp_path_factory.mktemp("report-artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def open_in_chromium(page: Path, shot: Path, tmp: Path) -> tuple[str, str]:
    """(the DOM as Chromium built it, its log) for `page`; a full-width screenshot into `shot`."""
    base = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    url = page.resolve().as_uri()
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    snap = subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1280,2400", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert snap.returncode == 0 and shot.is_file(), snap.stderr[-2000:]
    return dom.stdout, dom.stderr + snap.stderr


def charts_drawn(dom: str) -> tuple[int, int]:
    """(figures, figures whose SVG has a drawn path): every chart present and non-empty when equal."""
    figures = re.findall(r"<figure>(.*?)</figure>", dom, re.S)
    drawn = [f for f in figures if re.search(r"<svg\b.*<path\b[^>]*\bd=\"M[^\"]{20,}", f, re.S)]
    return len(figures), len(drawn)


def assert_clean_log(log: str) -> None:
    # The page has no script, so any console line (error or not) or page error is a problem.
    console = [line for line in log.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, "\n".join(console)


def assert_not_blank(png: Path) -> None:
    from PIL import Image

    with Image.open(png) as im:
        colours = im.convert("RGB").resize((320, 600)).getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50, f"{png}: looks blank ({len(colours)} colours)"


def test_bundled_report_renders_in_chromium(smoke_runs, artifacts, tmp_path):
    bundle = smoke_runs["bundles"][0]
    page = bundle / "eval" / "report.html"
    assert page.is_file(), "the smoke run's bundle holds no eval/report.html"
    ft("verify", str(bundle), cwd=tmp_path)  # the page is listed in the MANIFEST like every file
    dom, log = open_in_chromium(page, artifacts / "report.png", tmp_path)
    assert_clean_log(log)
    figures, drawn = charts_drawn(dom)
    assert figures == drawn == 4, (figures, drawn)  # loss, learning rate, tokens/s, length histogram (CPU)
    assert "KEEP" in dom or "DISCARD" in dom
    assert "Confusion matrix" in dom and "Worst examples" in dom
    assert_not_blank(artifacts / "report.png")


def test_comparison_of_two_learning_rates_renders_in_chromium(smoke_runs, artifacts, tmp_path):
    a, b = smoke_runs["runs"]
    page = artifacts / "compare.html"
    ft("report", str(a), str(b), "--out", str(page), cwd=tmp_path)
    dom, log = open_in_chromium(page, artifacts / "compare.png", tmp_path)
    assert_clean_log(log)
    assert "train.learning_rate" in dom
    figures, drawn = charts_drawn(dom)
    assert figures == drawn == 4, (figures, drawn)  # train loss, eval loss, learning rate, throughput
    assert_not_blank(artifacts / "compare.png")


def test_the_console_check_catches_errors_and_hostile_data_stays_text(tmp_path, artifacts):
    """Proves the check above can fail (a planted console error), and a hostile run's page runs nothing."""
    bad = tmp_path / "bad.html"
    bad.write_text('<p>x</p><script>console.error("planted"); missingFunction();</script>')
    _, log = open_in_chromium(bad, tmp_path / "bad.png", tmp_path)
    with pytest.raises(AssertionError, match="planted"):
        assert_clean_log(log)
    page = tmp_path / "hostile.html"
    from ft.report.html import write_run_report

    write_run_report(make_run(tmp_path, hostile=True), page)
    dom, log = open_in_chromium(page, artifacts / "hostile.png", tmp_path)
    assert_clean_log(log)
    assert "<script" not in dom and "<img" not in dom and "&lt;script&gt;alert(" in dom
