"""Resume after a hard kill, and the refusal to resume onto a changed recipe or changed data.

A kill is real: `ft train` runs in a subprocess with the test-only hook `FT_TEST_KILL_AT=
"<where>:<step>:<phase>"` (see ft/train/__init__.py), which SIGKILLs the process at that point -- mid-step (after
backward, before the optimizer step), at a step's end, half-way through a metrics line, at each stage
of a checkpoint write (between files, before the marker, before the rename, before and during pruning)
and while the final adapter is staged. Then `ft train --resume auto` runs on the same run directory,
and the adapter's bytes and the loss curve must equal an uninterrupted run's (bit for bit: this is CPU).

The default run kills one run seven times in a row (each resume is itself killed at a later point),
so seven kill points cost nine processes with the reference. `pytest -m slow` adds a seeded random
sweep over every kill point of a longer run that crosses an epoch boundary with gradient accumulation;
FT_KILL_SWEEP_N and FT_KILL_SWEEP_SEED choose how many points and which.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ft.cli import main
from ft.train import CHECKPOINT_MARKER, list_checkpoints, read_marker

SAVE_EVERY = 3
# 12 steps of the tiny recipe (micro-batch 8, no accumulation), a checkpoint every 3, the last 2 kept.
SHORT = [
    "--set",
    "train.max_steps=12",
    "--set",
    f"train.save_every={SAVE_EVERY}",
    "--set",
    "train.keep_last=2",
]
# 21 steps with 2 micro-batches per step: epoch 0 ends at step 17, so resumes land on both sides of it.
LONG = ["--set", "train.max_steps=21", *SHORT[2:], "--set", "train.effective_batch=16"]

# Every kill point, in the order a step reaches them.
STEP_PHASES = [("step", "mid"), ("step", "end"), ("metrics", "torn-line")]
CHECKPOINT_PHASES = ["between-files", "before-marker", "before-rename", "before-prune", "mid-prune"]


def _ft_train(work: Path, name: str, args: list[str], *, kill_at: str | None = None, resume: bool = False):
    env = {k: v for k, v in os.environ.items() if k != "FT_TEST_KILL_AT"}
    if kill_at:
        env["FT_TEST_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "ft", "train", "--recipe", "tiny", *args, "--set", f"output.run_name={name}"]
    cmd += ["--resume", "auto"] if resume else []
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)


def _fingerprint(run: Path) -> dict:
    """What must not differ from an uninterrupted run: adapter bytes, the loss curve, the kept checkpoints."""
    curve = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        row.pop("tokens_per_s", None)  # wall-clock, the one field allowed to differ
        curve.append(row)
    return {
        "adapter_sha256": hashlib.sha256(
            (run / "adapter" / "adapter_model.safetensors").read_bytes()
        ).hexdigest(),
        "curve": curve,
        "checkpoints": [p.name for p in list_checkpoints(run)],
    }


def _resume_step(point: str) -> int:
    """The step of the last complete checkpoint after a kill at `point` (where the resume starts)."""
    where, step, phase = point.split(":")
    n = int(step)
    if where == "adapter" or phase in ("before-prune", "mid-prune"):
        return n  # the checkpoint at n was renamed into place before the kill
    if where == "checkpoint":
        return n - SAVE_EVERY
    return (n - 1) // SAVE_EVERY * SAVE_EVERY  # step/metrics kills at n: checkpoint n is not written yet


def _assert_only_whole_checkpoints(run: Path, point: str) -> None:
    done = list_checkpoints(run)
    expected = _resume_step(point)
    assert (int(read_marker(done[-1])["step"]) if done else 0) == expected, (point, [p.name for p in done])
    for checkpoint in done:  # a marker is only ever next to every file it lists
        listed = read_marker(checkpoint)["files"]
        assert sorted(p.name for p in checkpoint.iterdir() if p.name != CHECKPOINT_MARKER) == listed, (
            checkpoint
        )


def _kill_chain(work: Path, name: str, args: list[str], points: list[str]) -> None:
    """Kill at each point in turn (each resume is killed at the next one), then resume to the end."""
    for i, point in enumerate(points):
        proc = _ft_train(work, name, args, kill_at=point, resume=i > 0)
        assert proc.returncode == -signal.SIGKILL, (
            f"{point}: the kill point was not reached\n{proc.stderr[-3000:]}"
        )
        _assert_only_whole_checkpoints(work / "runs" / name, point)
    proc = _ft_train(work, name, args, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [p.name for p in (work / "runs" / name / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not [p.name for p in (work / "runs" / name).iterdir() if p.name.startswith(".")]


def _reference(tmp_path_factory, args: list[str]) -> dict:
    work = tmp_path_factory.mktemp("reference")
    proc = _ft_train(work, "ref", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _fingerprint(work / "runs" / "ref")


@pytest.fixture(scope="module")
def short_reference(tmp_path_factory, tiny_model_dir) -> dict:
    return _reference(tmp_path_factory, SHORT)


def test_killed_seven_times_resumes_to_the_same_adapter_and_curve(tmp_path, short_reference):
    points = [
        "step:2:end",  # before the first checkpoint: the resume starts over (and drops the logged rows)
        "step:5:mid",  # mid-step: gradients computed, optimizer not stepped
        "checkpoint:6:between-files",  # weights staged, optimizer/scheduler/RNG not
        "checkpoint:9:before-rename",  # staged and marked, not yet renamed into place
        "metrics:10:torn-line",  # half a metrics line on disk
        "checkpoint:12:mid-prune",  # new checkpoint in place, an old one half-deleted
        "adapter:12:staged",  # training done, final adapter half-written
    ]
    _kill_chain(tmp_path, "killed", SHORT, points)
    assert _fingerprint(tmp_path / "runs" / "killed") == short_reference
    print(f"kill points tried and survived: {len(points)}: {', '.join(points)}")


def _all_points(max_steps: int) -> list[str]:
    points = []
    for n in range(1, max_steps + 1):
        points += [f"{w}:{n}:{p}" for w, p in STEP_PHASES]
        if n % SAVE_EVERY == 0:
            # Pruning starts once keep_last (2) checkpoints exist before the new one.
            points += [
                f"checkpoint:{n}:{p}" for p in CHECKPOINT_PHASES if p != "mid-prune" or n > 2 * SAVE_EVERY
            ]
    return [*points, f"adapter:{max_steps}:staged"]


def _chains(points: list[str]) -> list[list[str]]:
    """Group kill points into chains whose every point lies after where the previous kill resumes."""
    chains: list[list[str]] = []
    for point in points:
        step = int(point.split(":")[1])
        for chain in chains:
            if _resume_step(chain[-1]) < step:
                chain.append(point)
                break
        else:
            chains.append([point])
    return chains


@pytest.mark.slow
def test_random_kill_sweep_across_an_epoch_boundary(tmp_path, tmp_path_factory, tiny_model_dir):
    reference = _reference(tmp_path_factory, LONG)
    everything = _all_points(21)
    rng = random.Random(int(os.environ.get("FT_KILL_SWEEP_SEED", "20261124")))
    n = min(int(os.environ.get("FT_KILL_SWEEP_N", "16")), len(everything))
    sample = sorted(rng.sample(everything, n), key=everything.index)
    for i, chain in enumerate(_chains(sample)):
        _kill_chain(tmp_path, f"sweep{i}", LONG, chain)
        assert _fingerprint(tmp_path / "runs" / f"sweep{i}") == reference, chain
    print(f"kill points tried and survived: {len(sample)} of {len(everything)}: {', '.join(sample)}")


# -- refusing to resume onto other settings or other data ----------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> Path:
    """A 3-step run (one checkpoint) on a copy of the tiny data, trained in this process."""
    from ft.config import builtin_data_path

    work = tmp_path_factory.mktemp("trained")
    shutil.copy(builtin_data_path("tickets.jsonl"), work / "train.jsonl")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        assert main(["train", *_small_args(), "--set", "output.run_name=r"]) == 0
    finally:
        os.chdir(cwd)
    return work


def _small_args() -> list[str]:
    return [
        "--recipe",
        "tiny",
        "--train",
        "train.jsonl",
        "--set",
        "train.max_steps=3",
        "--set",
        "train.save_every=3",
    ]


@pytest.fixture
def again(trained, tmp_path, monkeypatch, capsys):
    """`again(*extra)` -> (exit code, last stderr line) of a `--resume auto` on a copy of the trained run."""
    work = tmp_path / "w"
    shutil.copytree(trained, work)
    monkeypatch.chdir(work)
    capsys.readouterr()

    def run(*extra: str) -> tuple[int, str]:
        code = main(["train", *_small_args(), "--set", "output.run_name=r", *extra, "--resume", "auto"])
        err = capsys.readouterr().err.strip().splitlines()
        return code, err[-1] if err else ""

    run.work = work
    return run


def test_changed_recipe_is_refused_naming_the_setting(again):
    code, line = again("--set", "train.learning_rate=0.02")
    assert code == 2
    assert line.startswith("error: cannot resume from step-000003: recipe changed")
    assert "train.learning_rate: 0.01 -> 0.02" in line and "--force" in line


def test_changed_data_is_refused_naming_it(again):
    path = again.work / "train.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-5]))
    code, line = again()
    assert code == 2
    assert "cannot resume from step-000003: data changed (sha256" in line and "recipe changed" not in line


def test_settings_that_do_not_change_the_maths_may_change(again):
    code, _ = again("--set", "eval.max_new_tokens=16", "--set", "description=renamed")
    assert code == 0


def test_force_resumes_anyway_and_records_what_changed(again, capsys):
    code = main(
        ["train", *_small_args(), "--set", "output.run_name=r", "--set", "train.learning_rate=0.02"]
        + ["--resume", "auto", "--force"]
    )
    assert code == 0
    assert "warning: resuming despite: recipe changed (train.learning_rate" in capsys.readouterr().err
    run = json.loads((again.work / "runs" / "r" / "run.json").read_text())
    assert any("train.learning_rate" in change for change in run["train"]["info"]["forced_resume"])
