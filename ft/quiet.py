"""Drop third-party log lines that are noise for an ft user, and only those.

Each entry names the logger and the start of the exact message; everything else those libraries log,
real warnings included, still reaches the console. The CLI installs the filters first thing.
"""

from __future__ import annotations

import logging

NOISE = {
    # bitsandbytes (0.50) on a CPU with AVX512-BF16 tries, when imported, to fetch an optional 4-bit CPU
    # kernel from the Hub through the `kernels` package and warns when it cannot. peft and transformers
    # import bitsandbytes whenever it is installed (the CUDA image), but ft never runs 4-bit on the CPU
    # (model.quantization nf4 needs CUDA), so on a CPU run the line is pure noise, and offline it is
    # always printed.
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
}


class DropMessage(logging.Filter):
    """Drops the records of one logger whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    """Attach the filters (idempotent). Loggers are created here if needed, so the order of imports
    does not matter: the filter is in place before the library logs anything."""
    for name, prefix in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(DropMessage(prefix))
