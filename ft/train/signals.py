"""Ctrl-C and `docker stop` during training: finish the step, checkpoint it, exit cleanly.

The first SIGINT or SIGTERM inside the training loop only sets a flag; the trainer callback made by
`stop_callback` sees it at the end of the current optimizer step and asks the trainer to save a
checkpoint and stop, so no finished step is lost. Outside the loop (loading the model, writing the final
adapter) there is no step to finish, and the signal stops the process at once with the same exception.
A second signal exits immediately: the last complete checkpoint is intact, because every checkpoint is
staged and renamed into place (ft.train), so an exit half-way through a write leaves only a staging
directory that the next run removes.

Exit codes follow the shell: 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_active: StopRequest | None = None


class Interrupted(KeyboardInterrupt):
    """Training stopped on a signal; `message` is the line for the console, `exit_code` 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.message = message
        self.signum = signum
        self.exit_code = 128 + signum

    def __str__(self) -> str:
        return self.message


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopRequest:
    """Context manager that owns SIGINT/SIGTERM while a training attempt runs (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        # "starting" (loading, before the loop), "training" (in the loop), "finishing" (after the loop)
        self.stage = "starting"
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopRequest:
        global _active
        # Python only lets the main thread set handlers; elsewhere (a notebook's worker) keep the defaults.
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        _active = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        _active = None

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal_name(signum)
        if self.signum is not None:
            _say(f"{name} again: exiting now; the last complete checkpoint is kept")
            os._exit(128 + signum)  # at once: no unwinding through the trainer, no atexit handlers
        self.signum = signum
        if self.stage == "starting":
            raise Interrupted(f"interrupted by {name} before training started; nothing was trained", signum)
        if self.stage == "finishing":
            raise Interrupted(
                f"interrupted by {name} after training, before the adapter was written; the last checkpoint "
                "holds the trained weights: run the same command with `--resume auto` to write it",
                signum,
            )
        _say(
            f"{name}: finishing the current step and writing a checkpoint, then stopping "
            f"({name} again exits at once)"
        )


def active() -> StopRequest | None:
    """The StopRequest of the training attempt in progress, if any."""
    return _active


def requested() -> bool:
    return _active is not None and _active.requested


def stop_callback(stop: StopRequest):
    """A TrainerCallback turning a pending stop request into save-this-step-and-stop."""
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            stop.stage = "training"

        def on_step_end(self, args, state, control, **kw):
            if stop.requested:
                control.should_save = True
                control.should_training_stop = True

        def on_epoch_end(self, args, state, control, **kw):
            # The loop broke off mid-epoch: this is not the epoch's end, so no end-of-epoch evaluation
            # (the resumed run evaluates when it really gets there, as an uninterrupted run would).
            if stop.requested and abs((state.epoch or 0) - round(state.epoch or 0)) > 1e-9:
                control.should_evaluate = False
                control.should_save = False

        def on_train_end(self, args, state, control, **kw):
            stop.stage = "finishing"

    return StopOnSignal()


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
