"""Automatic micro-batch: step-down on an out-of-memory at start-up, never mid-run; CPU with injected OOMs."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from ft import autobatch
from ft.autobatch import accumulation_for, is_oom, step_down
from ft.errors import FtError


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
    with pytest.raises(FtError) as info:
        step_down(trainer, 4, 16, started=trainer.started, current_step=lambda: trainer.steps)
    msg = str(info.value)
    assert "out of memory at step 37" in msg
    assert "--resume auto" in msg and "checkpoint is kept" in msg
    assert "train.micro_batch" in msg and "max_seq_length" in msg and "gradient_checkpointing" in msg
    assert trainer.calls == [(4, 4)]
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)


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
        "import sys; from ft.autobatch import is_oom, free_memory; "
        "print(is_oom(RuntimeError('CUDA error: out of memory')), is_oom(ValueError('x'))); free_memory(); "
        "print('torch' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.split() == ["True", "False", "False"]
