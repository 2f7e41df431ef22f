"""Where the test sessions get torch's CPU build when they install lockfiles/cpu.txt.

The CPU lock pins `torch==2.13.0+cpu`, which PyPI does not have: PyTorch publishes it on its own CPU
wheel index. A machine that keeps the wheel in a local folder names it in $PIP_FIND_LINKS and nothing
else is asked; anywhere else the index is added beside the default one. Either way `--require-hashes`
holds: the lock's torch hash is the wheel's digest as that index serves it, so a different file from
either place is refused. Standard library only: noxfile.py loads this file, and so do the tests.
"""

from __future__ import annotations

PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def find_links(value: str | None) -> list[str]:
    """`--find-links DIR` for each folder in a $PIP_FIND_LINKS value (space-separated, as pip reads it)."""
    return [arg for link in (value or "").split() for arg in ("--find-links", link)]


def cpu_lock_install_args(lock: str, *, find_links_env: str | None, installer: str) -> list[str]:
    """The arguments after `pip install` (installer "pip") or `uv pip install` ("uv") for the CPU lock.

    uv does not read pip's configuration, so the folder is passed explicitly. With the index, uv needs
    `--index-strategy unsafe-best-match`: by default it takes each package from the first index that
    lists it, and PyTorch's index also lists numpy, jinja2, sympy, ... at versions the lock may not pin.
    Looking at every index is safe here because each file must match a hash in the lock; pip always
    looks at every index.
    """
    if installer not in ("pip", "uv"):
        raise ValueError(f"installer {installer!r}: expected 'pip' or 'uv'")
    source = find_links(find_links_env)
    if not source:
        source = ["--extra-index-url", PYTORCH_CPU_INDEX]
        if installer == "uv":
            source += ["--index-strategy", "unsafe-best-match"]
    return ["--require-hashes", "--no-deps", *source, "-r", lock]
