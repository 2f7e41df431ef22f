"""Which run a command works in, and what is left behind when it fails before training.

`--run-dir` for a new path makes the run there; `ft train` without --resume refuses a run that already
trained (or was started), naming the way on; a setting that is not a finite number is one line, exit
2; any failure before the first optimizer step leaves no run directory; a second SIGINT/SIGTERM exits
at once. The kill, signal and --resume auto tests on real training are in tests/test_resume.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ft.cli import main
from ft.errors import FtError

ONE_STEP = ["--recipe", "tiny", "--set", "train.max_steps=1", "--set", "train.save_every=1"]


def ft(capsys, *argv: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("error:")]


@pytest.fixture
def work(tmp_path, monkeypatch, tiny_model_dir) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "setting", ["train.epochs=inf", "train.epochs=.nan", "train.learning_rate=-.inf", "lora.dropout=nan"]
)
def test_a_non_finite_number_is_one_line_and_leaves_no_run(work, capsys, setting):
    code, errors = ft(capsys, "train", "--recipe", "tiny", "--set", setting)
    key = setting.split("=")[0]
    assert code == 2 and len(errors) == 1 and f"--set: {key}: " in errors[0] and "finite" in errors[0]
    assert list(work.iterdir()) == []


def test_a_failure_before_the_first_step_leaves_no_run_directory(work, capsys, monkeypatch):
    from ft.backends import hf

    def cannot_load(settings, device):
        raise FtError(f"{settings.model.name_or_path}: cannot load the model")

    monkeypatch.setattr(hf, "load_for_training", cannot_load)
    code, errors = ft(capsys, "run", *ONE_STEP)
    assert code == 2 and errors == ["error: builtin:tiny-qwen2: cannot load the model"]
    assert list(work.iterdir()) == []  # neither the run nor the runs/ folder made for it

    # An interruption while the model loads (Ctrl-C before training) is the same: nothing to resume.
    def interrupted(settings, device):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler raises here
        raise AssertionError("SIGINT did not stop the load")

    monkeypatch.setattr(hf, "load_for_training", interrupted)
    capsys.readouterr()
    assert main(["train", *ONE_STEP]) == 130
    assert "interrupted by SIGINT before training started" in capsys.readouterr().err
    assert list(work.iterdir()) == []


def test_run_dir_that_does_not_exist_becomes_the_run_and_a_finished_run_is_not_retrained(work, capsys):
    code, _ = ft(capsys, "train", *ONE_STEP, "--run-dir", "exp/first")
    run = work / "exp" / "first"
    assert code == 0 and json.loads((run / "run.json").read_text())["status"] == "trained"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not (work / "runs").exists()
    adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()

    code, errors = ft(capsys, "train", *ONE_STEP, "--run-dir", "exp/first")
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith("error: exp/first: this run has already finished (status trained)")
    assert "--resume auto" in errors[0] and "output.run_name" in errors[0]
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter

    # The same through output.run_name, and for `ft run` (which only refuses a complete run).
    code, _ = ft(capsys, "train", *ONE_STEP, "--set", "output.run_name=named")
    assert code == 0
    code, errors = ft(capsys, "train", *ONE_STEP, "--set", "output.run_name=named")
    assert code == 2 and "runs/named: this run has already finished" in errors[0]


def test_a_started_run_is_not_overwritten_without_resume(work, capsys):
    from ft import pipeline
    from ft.config import load_settings

    prep = pipeline.check_data(load_settings("tiny", ["output.run_name=half"]))
    run = pipeline.create_run(prep)
    (run / "checkpoints" / "step-000003").mkdir(parents=True)
    (run / "checkpoints" / "step-000003" / "ft-checkpoint.json").write_text('{"step": 3}')
    pipeline.update_run(run, status="interrupted")
    code, errors = ft(capsys, "train", *ONE_STEP, "--set", "output.run_name=half")
    assert code == 2
    assert errors[0].startswith("error: runs/half: this run was started before (status interrupted")
    assert "last checkpoint step-000003" in errors[0] and "continue it with --resume auto" in errors[0]


def test_run_dir_that_is_not_a_run_is_refused(work, capsys):
    (work / "notes").mkdir()
    (work / "notes" / "todo.txt").write_text("x")
    code, errors = ft(capsys, "train", *ONE_STEP, "--run-dir", "notes")
    assert code == 2 and errors[0].startswith("error: --run-dir notes: exists and is not an ft run directory")
    assert sorted(p.name for p in (work / "notes").iterdir()) == ["todo.txt"]


SECOND_SIGNAL = """
import sys, time
from ft.train.signals import StopRequest
with StopRequest() as stop:
    stop.stage = "training"
    print("ready", flush=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.05)
print("not reached", flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_first_signal_asks_to_stop_and_the_second_exits_at_once(sig):
    proc = subprocess.Popen(
        [sys.executable, "-c", SECOND_SIGNAL], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(sig)
    time.sleep(0.5)
    assert proc.poll() is None  # the first one only asks the loop to checkpoint and stop
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig and "not reached" not in out
    name = signal.Signals(sig).name
    assert f"{name}: finishing the current step and writing a checkpoint" in err
    assert f"{name} again: exiting now; the last complete checkpoint is kept" in err
