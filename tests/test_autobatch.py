"""Automatic micro-batch: step-down on an out-of-memory at start-up, never mid-run; CPU with injected OOMs.

The first half drives `step_down` with a fake trainer; the second half goes through the real pipeline
(`pipeline.train_stage`, and `ft train` through the CLI) on the tiny model, with torch's CUDA
out-of-memory error raised from a patched `Trainer.training_step`."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from ft.errors import FtError
from ft.sizing import autobatch
from ft.sizing.autobatch import accumulation_for, is_oom, step_down


def cuda_oom(msg: str = "CUDA out of memory. Tried to allocate 2.00 GiB") -> Exception:
    """The error torch raises (torch.cuda.OutOfMemoryError exists on CPU builds too)."""
    return torch.cuda.OutOfMemoryError(msg)


class FakeTrainer:
    """attempt(micro, accum): OOMs for micro-batches above `fits`, optionally after `oom_at_step` steps."""

    def __init__(self, fits: int, oom_at_step: int | None = None, error=cuda_oom):
        self.fits, self.oom_at_step, self.error = fits, oom_at_step, error
        self.steps = 0
        self.calls: list[tuple[int, int]] = []

    def __call__(self, micro: int, accum: int):
        self.calls.append((micro, accum))
        if self.oom_at_step is not None:
            self.steps = self.oom_at_step
            raise self.error()
        if micro > self.fits:
            raise self.error()
        return {"micro": micro, "accum": accum}

    def started(self) -> bool:
        return self.steps > 0


def test_accumulation_keeps_the_effective_batch():
    for effective in (1, 6, 16, 24, 64):
        for micro in autobatch.divisors_desc(effective):
            assert micro * accumulation_for(micro, effective) == effective
    with pytest.raises(FtError, match="does not divide"):
        accumulation_for(3, 16)
    with pytest.raises(FtError, match="positive"):
        accumulation_for(0, 16)


def test_steps_down_through_divisors_until_it_fits():
    trainer = FakeTrainer(fits=3)
    result, micro, attempts = step_down(trainer, 16, 24, started=trainer.started)
    # 16 is not a divisor of 24: start from 12, then 8, 6, 4, 3
    assert [c[0] for c in trainer.calls] == [12, 8, 6, 4, 3]
    assert all(m * a == 24 for m, a in trainer.calls)
    assert (micro, result) == (3, {"micro": 3, "accum": 8})
    assert [a["outcome"] for a in attempts] == ["oom"] * 4 + ["ok"]
    assert attempts[0] == {
        "micro_batch": 12,
        "grad_accum": 2,
        "outcome": "oom",
        "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
    }


def test_first_try_fits():
    trainer = FakeTrainer(fits=64)
    result, micro, attempts = step_down(trainer, 8, 16, started=trainer.started)
    assert micro == 8 and attempts == [{"micro_batch": 8, "grad_accum": 2, "outcome": "ok"}]


def test_runtime_error_with_out_of_memory_message_counts():
    trainer = FakeTrainer(fits=2, error=lambda: RuntimeError("CUDA error: out of memory"))
    _, micro, _ = step_down(trainer, 8, 8, started=trainer.started)
    assert micro == 2


def test_wrapped_oom_is_recognised_and_other_errors_are_not_retried():
    try:
        try:
            raise cuda_oom()
        except Exception as inner:
            raise ValueError("trainer failed") from inner
    except ValueError as outer:
        assert is_oom(outer)
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(MemoryError("host RAM"))

    trainer = FakeTrainer(fits=1, error=lambda: ValueError("bad data"))
    with pytest.raises(ValueError, match="bad data"):
        step_down(trainer, 8, 8, started=trainer.started)
    assert trainer.calls == [(8, 1)]  # not retried


def test_oom_after_training_started_is_not_retried():
    trainer = FakeTrainer(fits=64, oom_at_step=37)
    with pytest.raises(autobatch.OutOfMemory) as info:
        step_down(
            trainer,
            4,
            16,
            started=trainer.started,
            current_step=lambda: trainer.steps,
            checkpoint=lambda: "checkpoints/step-000036",
        )
    msg = str(info.value)
    assert msg.startswith("out of memory at step 37 (micro-batch 4 x accumulation 4); not retried")
    assert "the last complete checkpoint (checkpoints/step-000036) is kept" in msg
    assert "start a new run with train.micro_batch 2 (the effective batch 16 is kept" in msg
    assert "--resume auto" in msg and "max_seq_length" in msg and "gradient_checkpointing" in msg
    assert trainer.calls == [(4, 4)]
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)
    assert [a["outcome"] for a in info.value.attempts] == ["oom mid-run"]


def test_mid_run_message_without_a_checkpoint_or_a_smaller_micro_batch():
    msg = autobatch.mid_run_message(1, 16, 5, None)
    assert "no checkpoint had been written yet" in msg
    assert "train.micro_batch" not in msg and "shorter train.max_seq_length" in msg


def test_a_fixed_micro_batch_is_not_stepped_down():
    trainer = FakeTrainer(fits=2)
    with pytest.raises(autobatch.OutOfMemory) as info:
        step_down(trainer, 8, 16, started=trainer.started, retry=False)
    assert trainer.calls == [(8, 2)]
    msg = str(info.value)
    assert "not stepped down: train.micro_batch is fixed at 8" in msg
    assert "train.micro_batch: auto" in msg and "(4, 2, 1)" in msg
    with pytest.raises(autobatch.OutOfMemory, match="resuming step-000010 keeps its micro-batch"):
        step_down(
            FakeTrainer(fits=2),
            8,
            16,
            started=lambda: False,
            retry="resuming step-000010 keeps its micro-batch",
        )


def test_oom_after_start_without_a_step_counter():
    trainer = FakeTrainer(fits=64, oom_at_step=3)
    with pytest.raises(FtError, match="after training had started"):
        step_down(trainer, 4, 16, started=trainer.started)


def test_oom_even_at_micro_batch_one_points_to_ft_size():
    trainer = FakeTrainer(fits=0)
    with pytest.raises(FtError) as info:
        step_down(trainer, 4, 4, started=trainer.started)
    assert "even with micro-batch 1" in str(info.value) and "ft size" in str(info.value)
    assert [c[0] for c in trainer.calls] == [4, 2, 1]


def test_memory_of_a_failed_attempt_is_released_before_the_retry(monkeypatch):
    """The tensors the failed attempt's frames held are garbage by the time the next attempt runs."""
    held: list[weakref.ref] = []
    freed: list[bool] = []
    monkeypatch.setattr(autobatch, "free_memory", lambda: (gc.collect(), freed.append(True)))

    def attempt(micro, accum):
        if held:
            assert held[-1]() is None, "the failed attempt's buffer is still alive"
        big = torch.empty(micro * 1024)
        held.append(weakref.ref(big))
        if micro > 1:
            raise cuda_oom()
        return micro

    result, micro, _ = step_down(attempt, 4, 4, started=lambda: False)
    assert (result, micro) == (1, 1) and freed == [True, True]


def test_log_callback_reports_each_retry():
    lines: list[str] = []
    trainer = FakeTrainer(fits=2)
    step_down(trainer, 8, 8, started=trainer.started, log=lines.append)
    assert lines == [
        "out of memory at micro-batch 8 before the first step; retrying with 4",
        "out of memory at micro-batch 4 before the first step; retrying with 2",
    ]


def test_oom_detection_does_not_import_torch():
    code = (
        "import sys; from ft.sizing.autobatch import is_oom, free_memory; "
        "print(is_oom(RuntimeError('CUDA error: out of memory')), is_oom(ValueError('x'))); free_memory(); "
        "print('torch' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.split() == ["True", "False", "False"]


# -- through the real pipeline: train_stage and `ft train` on the tiny model, OOMs injected -------------------
INJECTED = "CUDA out of memory. Tried to allocate 1.00 GiB (injected by the test)"


@pytest.fixture
def inject_oom(monkeypatch):
    """Patch transformers' Trainer.training_step (TRL's SFTTrainer calls it) to raise torch's CUDA OOM when
    `when(trainer)` is true; returns the micro-batch of every training step that was attempted."""
    from transformers import Trainer

    real = Trainer.training_step
    seen: list[int] = []

    def install(when):
        def training_step(self, *args, **kwargs):
            seen.append(self.args.per_device_train_batch_size)
            if when(self):
                raise torch.cuda.OutOfMemoryError(INJECTED)
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Trainer, "training_step", training_step)
        return seen

    return install


def _auto_settings(tiny_settings, tmp_path, **kw):
    base = {
        "train.micro_batch": "auto",
        "train.effective_batch": 8,
        "train.max_steps": 3,
        "train.save_every": 1,
        "output.dir": str(tmp_path / "runs"),
        "output.run_name": "oom",
    }
    return tiny_settings(**(base | kw))


def test_train_stage_steps_down_on_a_startup_oom_and_records_the_choice(tiny_settings, tmp_path, inject_oom):
    from ft import pipeline

    seen = inject_oom(lambda trainer: trainer.args.per_device_train_batch_size > 2)
    s = _auto_settings(tiny_settings, tmp_path)
    prep = pipeline.check_data(s)
    run_dir = pipeline.create_run(prep)
    result = pipeline.train_stage(prep, run_dir, resume=None)

    assert (result.micro_batch, result.grad_accum, result.steps) == (2, 4, 3)
    assert seen[:2] == [8, 4] and set(seen[2:]) == {2}  # one failed step at 8, one at 4, then real steps at 2
    env_run = json.loads((run_dir / "env.json").read_text())["run"]
    assert (env_run["micro_batch"], env_run["grad_accum"]) == (2, 4)
    choice = env_run["micro_batch_choice"]
    assert choice["setting"] == "auto" and choice["start"] == 8 and choice["effective_batch"] == 8
    assert choice["source"].startswith("auto on CPU")
    assert [(a["micro_batch"], a["grad_accum"], a["outcome"]) for a in choice["attempts"]] == [
        (8, 1, "oom"),
        (4, 2, "oom"),
        (2, 4, "ok"),
    ]
    assert choice["attempts"][0]["error"] == f"OutOfMemoryError: {INJECTED}"
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "trained" and meta["micro_batch_choice"] == choice
    assert meta["train"]["micro_batch_attempts"] == choice["attempts"]
    # the checkpoints were written by the attempt that ran, with its micro-batch
    marker = json.loads((run_dir / "checkpoints" / "step-000003" / "ft-checkpoint.json").read_text())
    assert (marker["micro_batch"], marker["grad_accum"]) == (2, 4)


def test_ft_train_oom_mid_run_is_not_retried_and_keeps_the_checkpoint(
    tiny_settings, tmp_path, inject_oom, capsys, monkeypatch
):
    from ft.cli import main

    seen = inject_oom(lambda trainer: trainer.state.global_step >= 2)  # steps 1 and 2 complete, step 3 OOMs
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "train",
            "--recipe",
            "tiny",
            "--set",
            "train.micro_batch=auto",
            "--set",
            "train.max_steps=4",
            "--set",
            "train.save_every=1",
            "--set",
            "output.run_name=midrun",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    # one error line (the progress bar may precede it on the same terminal line: split at its "\r" too)
    lines = [
        line[line.index("error:") :] for line in err.replace("\r", "\n").splitlines() if "error:" in line
    ]
    assert len(lines) == 1 and "Traceback" not in err
    msg = lines[0]
    assert msg.startswith("error: out of memory at step 3 (micro-batch 8 x accumulation 1); not retried")
    assert "the last complete checkpoint (checkpoints/step-000002) is kept" in msg
    assert "start a new run with train.micro_batch 4 (the effective batch 8 is kept" in msg
    assert "`ft train --resume auto` continues from the checkpoint" in msg
    assert set(seen) == {8}  # never retried with a smaller micro-batch

    run_dir = tmp_path / "runs" / "midrun"
    marker = json.loads((run_dir / "checkpoints" / "step-000002" / "ft-checkpoint.json").read_text())
    assert marker["step"] == 2
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "failed" and meta["error"].startswith("out of memory at step 3")
    assert meta["micro_batch_attempts"] == [
        {
            "micro_batch": 8,
            "grad_accum": 1,
            "outcome": "oom mid-run",
            "error": f"OutOfMemoryError: {INJECTED}",
            "step": 3,
        }
    ]


def test_a_fixed_micro_batch_startup_oom_says_to_use_auto(tiny_settings, tmp_path, inject_oom):
    from ft import pipeline

    seen = inject_oom(lambda trainer: True)
    s = _auto_settings(tiny_settings, tmp_path, **{"train.micro_batch": 4})
    prep = pipeline.check_data(s)
    run_dir = pipeline.create_run(prep)
    with pytest.raises(autobatch.OutOfMemory, match="train.micro_batch is fixed at 4") as info:
        pipeline.train_stage(prep, run_dir, resume=None)
    assert "train.micro_batch: auto" in str(info.value)
    assert seen == [4]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
