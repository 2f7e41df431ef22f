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

Without `output.run_name` (the default path), `--resume auto` must find the killed run by the hashes in
its run.json, past newer decoys. A stop signal is real too: with `FT_TEST_PAUSE_AT` the process waits at
a step's end until this test sends it SIGINT or SIGTERM, and must checkpoint that step and exit 130/143.
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
import time
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


def _ft_cmd(name: str | None, args: list[str], resume: bool) -> list[str]:
    """`ft train` on the tiny recipe; name None = the default path (no output.run_name)."""
    cmd = [sys.executable, "-m", "ft", "train", "--recipe", "tiny", *args]
    cmd += ["--set", f"output.run_name={name}"] if name else []
    return cmd + (["--resume", "auto"] if resume else [])


def _ft_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FT_TEST_")}
    return {**env, **extra}


def _ft_train(
    work: Path, name: str | None, args: list[str], *, kill_at: str | None = None, resume: bool = False
):
    env = _ft_env(**({"FT_TEST_KILL_AT": kill_at} if kill_at else {}))
    return subprocess.run(
        _ft_cmd(name, args, resume), cwd=work, env=env, capture_output=True, text=True, timeout=900
    )


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


# -- the default path (no output.run_name) and stop signals ------------------------------------------------
def _only_run(work: Path) -> Path:
    runs = [p for p in (work / "runs").iterdir() if not p.name.startswith(".")]
    assert len(runs) == 1, [p.name for p in runs]
    return runs[0]


def _decoy(run: Path, name: str, **changes) -> None:
    """A copy of `run`, made later, that --resume auto must pass over."""
    copy = run.with_name(name)
    shutil.copytree(run, copy)
    meta = json.loads((copy / "run.json").read_text())
    meta.update(name=name, created="2999-01-01T00:00:00Z", **changes)
    (copy / "run.json").write_text(json.dumps(meta))


def test_resume_auto_finds_the_killed_run_without_a_run_name(tmp_path, short_reference):
    proc = _ft_train(tmp_path, None, SHORT, kill_at="step:5:end")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    killed = _only_run(tmp_path)
    # Newer runs of the same recipe name that are finished, or made from other data, are not the one.
    _decoy(killed, "tiny-29990101-000000-finished", status="complete")
    _decoy(killed, "tiny-29990101-000000-otherdata", data_sha256="0" * 64)

    proc = _ft_train(tmp_path, None, SHORT, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming run {killed.name} from step 3 of 12" in proc.stdout
    assert len(list((tmp_path / "runs").iterdir())) == 3  # no new run
    assert json.loads((killed / "run.json").read_text())["status"] == "trained"
    assert _fingerprint(killed) == short_reference


def _signal_at(work: Path, sig: int, step: int) -> tuple[int, str]:
    """`ft train` (default path) that receives `sig` from this process while at the end of `step`."""
    flag = work / "paused"
    env = _ft_env(FT_TEST_PAUSE_AT=f"step:{step}:end", FT_TEST_PAUSE_FILE=str(flag))
    with open(work / "stderr.txt", "w") as err:
        proc = subprocess.Popen(_ft_cmd(None, SHORT, False), cwd=work, env=env, stdout=err, stderr=err)
        try:
            deadline = time.monotonic() + 600
            while not flag.exists():
                assert proc.poll() is None, (work / "stderr.txt").read_text()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.05)
            proc.send_signal(sig)
            code = proc.wait(timeout=600)
        finally:
            proc.kill()
    return code, (work / "stderr.txt").read_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_checkpoints_the_current_step_and_resume_ends_the_same(tmp_path, short_reference, sig):
    code, err = _signal_at(tmp_path, sig, step=5)
    name = signal.Signals(sig).name
    assert code == 128 + sig, err[-3000:]  # 130 for SIGINT (Ctrl-C), 143 for SIGTERM (docker stop)
    run = _only_run(tmp_path)
    assert [p.name for p in list_checkpoints(run)] == ["step-000003", "step-000005"]
    _assert_only_whole_checkpoints(run, "checkpoint:5:before-prune")
    assert f"interrupted by {name} at step 5: checkpoint step-000005 holds step 5 of 12" in err
    assert "run the same command with `--resume auto` to continue" in err.splitlines()[-1]
    assert not (run / "adapter").exists()
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    if sig == signal.SIGTERM:
        return  # the resume is the same either way; one is enough for the default test run
    proc = _ft_train(tmp_path, None, SHORT, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming run {run.name} from step 5 of 12" in proc.stdout
    assert _only_run(tmp_path) == run
    assert _fingerprint(run) == short_reference


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
