"""Same recipe, data and seed on CPU -> the same loss curve and the same adapter bytes; a golden curve.

Two seeded runs of the tiny recipe must agree exactly (every logged number, and the adapter's sha256),
a different seed must not (so the seed is really applied), and the curve must match the committed
golden one, tests/golden/tiny_loss.json, within a relative 1e-4 per step. The golden file records the
versions that produced it; after a deliberate upgrade of torch or transformers, regenerate it with

    python tests/test_determinism.py --update-golden

and commit the new file with the upgrade, so the change of numbers is reviewed, not absorbed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import tempfile
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden" / "tiny_loss.json"
STEPS = 24
OVERRIDES = [f"train.max_steps={STEPS}", "train.save_every=1000"]
RTOL = 1e-4
VERSIONED = ("torch", "transformers", "peft", "trl", "accelerate")


def train_tiny(work: Path, name: str, *extra: str) -> Path:
    """`ft train --recipe tiny` for STEPS steps, in this process; returns the run directory."""
    from ft.cli import main

    cwd = os.getcwd()
    os.chdir(work)
    try:
        argv = ["train", "--recipe", "tiny", "--set", f"output.run_name={name}"]
        for item in [*OVERRIDES, *extra]:
            argv += ["--set", item]
        assert main(argv) == 0
    finally:
        os.chdir(cwd)
    return work / "runs" / name


def curve(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("tokens_per_s", None)  # wall-clock
    return rows


def adapter_sha256(run: Path) -> str:
    return hashlib.sha256((run / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"python": platform.python_version(), **{name: version(name) for name in VERSIONED}}


def test_two_seeded_runs_are_identical_and_another_seed_is_not(tmp_path, tiny_model_dir):
    first, second = train_tiny(tmp_path, "one"), train_tiny(tmp_path, "two")
    assert curve(first) == curve(second)
    assert adapter_sha256(first) == adapter_sha256(second)
    other = train_tiny(tmp_path, "seed7", "train.seed=7")
    assert adapter_sha256(other) != adapter_sha256(first)
    assert [r.get("loss") for r in curve(other)] != [r.get("loss") for r in curve(first)]
    check_golden([r["loss"] for r in curve(first) if r["kind"] == "train"])


def check_golden(losses: list[float]) -> None:
    golden = json.loads(GOLDEN.read_text())
    now = versions()
    changed = [
        f"{k} {golden['versions'].get(k)} -> {v}" for k, v in now.items() if golden["versions"].get(k) != v
    ]
    why = (
        f"; the golden curve was recorded with other versions ({', '.join(changed)}): if that upgrade is "
        "deliberate, regenerate it with `python tests/test_determinism.py --update-golden` and commit it"
        if changed
        else ""
    )
    assert len(losses) == len(golden["loss"]), f"{len(losses)} logged steps, golden has {len(golden['loss'])}"
    off = [
        f"step {i + 1}: {got!r} vs golden {want!r}"
        for i, (got, want) in enumerate(zip(losses, golden["loss"], strict=True))
        if not math.isclose(got, want, rel_tol=golden["rtol"])
    ]
    if off:
        pytest.fail(
            f"loss curve differs from tests/golden/tiny_loss.json (rtol {golden['rtol']}): {off[0]}{why}"
        )


def update_golden() -> None:
    with tempfile.TemporaryDirectory(prefix="ft-golden-") as tmp:
        os.environ.setdefault("FT_CACHE", str(Path(tmp) / "cache"))
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            os.environ.setdefault(name, "1")  # before anything imports the Hugging Face libraries
        from ft.testing import ensure_tiny_model

        ensure_tiny_model()
        run = train_tiny(Path(tmp), "golden")
        losses = [r["loss"] for r in curve(run) if r["kind"] == "train"]
    GOLDEN.parent.mkdir(exist_ok=True)
    record = {
        "what": f"training loss per step of `ft train --recipe tiny` with {', '.join(OVERRIDES)} (CPU)",
        "how": "python tests/test_determinism.py --update-golden",
        "rtol": RTOL,
        "versions": versions(),
        "loss": losses,
    }
    GOLDEN.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {GOLDEN} ({len(losses)} steps)")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update-golden"]:
        raise SystemExit("usage: python tests/test_determinism.py --update-golden")
    update_golden()
