"""Automatic micro-batch: start from the size prediction, step down on a real out-of-memory at start-up.

The effective batch (micro-batch x gradient accumulation) never changes, so the optimisation is the
same whichever micro-batch is chosen: micro-batches are divisors of the effective batch, tried from
the largest predicted to fit downwards. An out-of-memory *after* training started is not retried: the
run stops, its last complete checkpoint stays, and the message says what to change.

Nothing here imports torch: a run that never touched CUDA has no CUDA error to recognise.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from ft.errors import FtError

T = TypeVar("T")

OOM_ADVICE = (
    "lower train.micro_batch or train.max_seq_length, or turn train.gradient_checkpointing on; "
    "`ft size` shows the predicted peak against this GPU"
)


def divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def accumulation_for(micro: int, effective: int) -> int:
    """Gradient accumulation that keeps `effective` examples per optimizer step."""
    if micro < 1 or effective < 1:
        raise FtError(f"micro-batch ({micro}) and effective batch ({effective}) must be positive")
    if effective % micro:
        raise FtError(
            f"train.micro_batch {micro} does not divide train.effective_batch {effective}",
            hint="choose one of " + ", ".join(map(str, sorted(divisors_desc(effective)))),
        )
    return effective // micro


def largest_divisor_at_most(limit: int, effective: int) -> int:
    return next(d for d in divisors_desc(effective) if d <= max(1, limit))


def is_oom(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, also when wrapped (checked along __cause__/__context__)."""
    seen: set[int] = set()
    torch = sys.modules.get("torch")  # only if the attempt loaded it
    oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch else None
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if oom_type is not None and isinstance(e, oom_type):
            return True
        if isinstance(e, RuntimeError) and "out of memory" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def free_memory() -> None:
    """Drop what the failed attempt left: Python garbage first, then the CUDA caching allocator's blocks."""
    gc.collect()
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None) if torch else None
    if cuda is not None and cuda.is_available():
        cuda.empty_cache()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class OutOfMemory(FtError):
    """An out-of-memory ft does not (or can no longer) retry; `attempts` is what was tried, for the manifest."""

    def __init__(
        self, message: str, *, hint: str | None = None, attempts: list[dict[str, Any]] | None = None
    ):
        super().__init__(message, hint=hint)
        self.attempts = list(attempts or [])


def mid_run_message(micro: int, accum: int, step: int | None, checkpoint: str | None) -> str:
    """What to say when memory runs out after training started: where, what is kept, what to change."""
    where = f"at step {step}" if step is not None else "after training had started"
    smaller = [d for d in divisors_desc(micro * accum) if d < micro]
    kept = (
        f"the last complete checkpoint ({checkpoint}) is kept"
        if checkpoint
        else "no checkpoint had been written yet (train.save_every)"
    )
    change = (
        f"start a new run with train.micro_batch {smaller[0]} (the effective batch {micro * accum} is kept "
        "through gradient accumulation) or a shorter train.max_seq_length"
        if smaller
        else "start a new run with a shorter train.max_seq_length"
    )
    return (
        f"out of memory {where} (micro-batch {micro} x accumulation {accum}); not retried in the middle of a "
        f"run: {kept}. To go on, {change}; `ft train --resume auto` continues from the checkpoint with the "
        "same settings"
    )


def step_down(
    attempt: Callable[[int, int], T],
    start: int,
    effective: int,
    *,
    started: Callable[[], Any],
    current_step: Callable[[], int | None] | None = None,
    checkpoint: Callable[[], str | None] | None = None,
    log: Callable[[str], None] | None = None,
    retry: bool | str = True,
) -> tuple[T, int, list[dict[str, Any]]]:
    """Run attempt(micro, accum) from the largest divisor of `effective` <= start, stepping down on OOM.

    started() tells whether training has begun (an optimizer step completed in this attempt); an OOM
    after that is not retried: OutOfMemory names the step (current_step()) and the checkpoint that is
    kept (checkpoint()) and says what to change. `retry` False (a fixed train.micro_batch) or a string
    (why the micro-batch cannot change, e.g. a resumed checkpoint pins it) turns the step-down off.
    Returns (the attempt's result, the micro-batch it ran with, one record per attempt for the manifest).
    """
    micro = largest_divisor_at_most(start, effective)
    attempts: list[dict[str, Any]] = []
    while True:
        accum = accumulation_for(micro, effective)
        try:
            result = attempt(micro, accum)
        except Exception as exc:
            if not is_oom(exc):
                raise
            record = {"micro_batch": micro, "grad_accum": accum, "outcome": "oom", "error": first_line(exc)}
            if started():
                step = current_step() if current_step else None
                record.update(outcome="oom mid-run", step=step)
                attempts.append(record)
                raise OutOfMemory(
                    mid_run_message(micro, accum, step, checkpoint() if checkpoint else None),
                    hint=OOM_ADVICE,
                    attempts=attempts,
                ) from exc
            attempts.append(record)
            smaller = [d for d in divisors_desc(effective) if d < micro]
            if retry is not True:
                why = retry if isinstance(retry, str) else f"train.micro_batch is fixed at {micro}"
                raise OutOfMemory(
                    f"out of memory at start-up with micro-batch {micro} (x accumulation {accum}); not stepped "
                    f"down: {why}",
                    hint="set train.micro_batch: auto to let ft step down keeping the effective batch, or pick "
                    f"a smaller divisor of train.effective_batch {effective}"
                    + (f" ({', '.join(map(str, smaller))})" if smaller else "")
                    + "; `ft size` shows the predicted peak",
                    attempts=attempts,
                ) from exc
            if not smaller:
                raise OutOfMemory(
                    f"out of memory at start-up even with micro-batch 1 (x accumulation {accum})",
                    hint="run `ft size` to see the predicted peak; lower train.max_seq_length, keep "
                    "model.quantization nf4 and train.gradient_checkpointing on, or use a larger GPU",
                    attempts=attempts,
                ) from exc
            # Leave the except block first so the traceback (and the tensors its frames hold) can be freed.
        else:
            attempts.append({"micro_batch": micro, "grad_accum": accum, "outcome": "ok"})
            return result, micro, attempts
        free_memory()
        if log:
            log(f"out of memory at micro-batch {micro} before the first step; retrying with {smaller[0]}")
        micro = smaller[0]
