"""Test-only fault points: die or pause at a named point of training, checkpointing or saving.

`FT_TEST_KILL_AT="<where>:<step>:<phase>"` makes the process SIGKILL itself at that point (as `kill -9`
would: no cleanup, no flush), so tests/test_resume.py and tests/test_distributed.py can prove that a run
killed anywhere resumes to the same adapter; `FT_TEST_KILL_RANK` arms it on one rank only.
`FT_TEST_PAUSE_AT` (same form) with `FT_TEST_PAUSE_FILE` touches that file at the point and waits there
for a stop signal, so a test can send a real SIGINT/SIGTERM at a known step. Unset, each point costs one
environment lookup.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from ft.train import signals


def _test_kill_armed(where: str, step: int, phase: str) -> bool:
    """Test-only: is FT_TEST_KILL_AT set to this point? (Never set outside tests/test_resume.py and
    tests/test_distributed.py; FT_TEST_KILL_RANK, when set, arms it on that rank only.)"""
    if os.environ.get("FT_TEST_KILL_AT") != f"{where}:{step}:{phase}":
        return False
    only = os.environ.get("FT_TEST_KILL_RANK")
    return only is None or only == os.environ.get("RANK", "0")


def _test_kill_point(where: str, step: int, phase: str) -> None:
    """Test-only: die here, as `kill -9` would (no cleanup, no flush), when FT_TEST_KILL_AT names this point."""
    if _test_kill_armed(where, step, phase):
        os.kill(os.getpid(), signal.SIGKILL)


def _test_pause_point(where: str, step: int, phase: str) -> None:
    """Test-only: touch FT_TEST_PAUSE_FILE and wait (up to 5 minutes) for a stop signal at this point."""
    if os.environ.get("FT_TEST_PAUSE_AT") != f"{where}:{step}:{phase}":
        return
    Path(os.environ["FT_TEST_PAUSE_FILE"]).touch()
    deadline = time.monotonic() + 300
    while not signals.requested() and time.monotonic() < deadline:
        time.sleep(0.02)
