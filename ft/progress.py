"""Progress bars for ft's long steps, drawn the same way everywhere.

In a terminal: a live bar with rate and ETA. In a log file (CI, `docker compose run -T`, a redirected
stderr): a plain line every 15 s at most, so logs stay readable. Work that ends before the bar's delay
(1 s in a terminal, 10 s in a log) draws nothing, so quick commands and the one-line error rule stay clean.
"""

from __future__ import annotations

import sys
from typing import Any

TTY_REFRESH_S = 0.2
LOG_REFRESH_S = 15.0
TTY_DELAY_S = 1.0
LOG_DELAY_S = 10.0


def bar(total: float | None, desc: str, unit: str, **kw: Any):
    """A tqdm bar on stderr (use as a context manager). `unit="B"` counts bytes in KiB/MiB."""
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    options: dict[str, Any] = {
        "total": total,
        "desc": desc,
        "unit": unit,
        "dynamic_ncols": True,
        "mininterval": TTY_REFRESH_S if tty else LOG_REFRESH_S,
        "delay": TTY_DELAY_S if tty else LOG_DELAY_S,
        "leave": tty,
    }
    if unit == "B":
        options.update(unit_scale=True, unit_divisor=1024)
    options.update(kw)
    return tqdm(**options)
