"""Noise from third-party libraries is dropped on the console; their real warnings are not."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

BNB = "bitsandbytes.backends.cpu.ops"
NOISE = (
    "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
    "`pip install kernels` and the kernels >= 0.11.1"
)


def test_ft_cli_drops_bitsandbytes_cpu_kernel_noise_but_keeps_real_warnings(tmp_path):
    """A fake bitsandbytes that logs, on import, what 0.50.2 logs on an AVX512-BF16 CPU without `kernels`.

    Imported after the CLI started, the way peft imports the real one; stderr must hold only the
    real warning.
    """
    pkg = tmp_path / "bitsandbytes" / "backends" / "cpu"
    pkg.mkdir(parents=True)
    for folder in (pkg, pkg.parent, pkg.parent.parent):
        (folder / "__init__.py").write_text("")
    (pkg / "ops.py").write_text(
        textwrap.dedent(
            f"""
            import logging
            logger = logging.getLogger(__name__)
            logger.warning({NOISE!r}, "No module named 'kernels'")
            logger.warning("a real warning from bitsandbytes")
            """
        )
    )
    script = "import ft.cli, sys; ft.cli.main(['recipes']); import bitsandbytes.backends.cpu.ops"
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": f"{tmp_path}:{Path(__file__).parent.parent}", "PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert "gemm_4bit_forward" not in proc.stderr
    assert "a real warning from bitsandbytes" in proc.stderr


def test_filter_matches_only_the_noise():
    from ft.quiet import DropMessage

    f = DropMessage("Failed to load CPU gemm_4bit_forward")
    make = lambda msg: logging.LogRecord(BNB, logging.WARNING, __file__, 1, msg, ("x",), None)  # noqa: E731
    assert not f.filter(make(NOISE))
    assert f.filter(make("Failed to load the CUDA library: %s"))
