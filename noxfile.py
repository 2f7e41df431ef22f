"""Developer and CI sessions for ft.

    nox                      # the default run (what CI runs): lint, tests, smoke, slow
    nox -s tests -- -k data  # pytest with extra arguments
    nox -s smoke             # `ft run` on the tiny recipe, then `ft verify` on its bundle

Sessions are thin: each one calls the shared helpers below. Test environments are installed from the
hashed CPU lock (lockfiles/cpu.txt) so CI tests exactly what the test image runs, and they are hermetic:
the Hugging Face libraries are forced offline, so a test that tried to download would fail.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

ROOT = Path(__file__).parent
CPU_LOCK = ROOT / "lockfiles" / "cpu.txt"
PYTHON = "3.11"
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "true",
    "PYTHONHASHSEED": "0",
}

nox.options.sessions = ["lint", "tests", "smoke", "slow"]
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_venv = "yes"


def _print_versions(session: nox.Session, *tools: str) -> None:
    """Print the versions a session ran with first, so every log says what produced it."""
    session.run("python", "--version", silent=False)
    for tool in tools:
        session.run(tool, "--version", silent=False, external=True)


def _find_links() -> list[str]:
    """The machine's local wheel folder (where the CPU torch build lives), if pip is configured with one.

    uv does not read pip's configuration, so it is passed on explicitly; the path never enters the repo.
    """
    links = os.environ.get("PIP_FIND_LINKS", "").split()
    return [arg for link in links for arg in ("--find-links", link)]


def install_locked(session: nox.Session) -> None:
    """Install the exact CPU lock (hash-checked), then ft itself without touching the pins."""
    if not CPU_LOCK.is_file():
        session.error(f"{CPU_LOCK.relative_to(ROOT)} is missing: run `nox -s lock` first")
    # With the uv backend `session.install` is `uv pip install`; both accept these flags.
    session.install("--require-hashes", "--no-deps", *_find_links(), "-r", str(CPU_LOCK))
    session.install("--no-deps", "-e", ".")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite (offline, CPU). Extra arguments go to pytest."""
    install_locked(session)
    _print_versions(session)
    session.run("python", "-m", "ft", "env", "--short", env=OFFLINE)
    session.run("pytest", "-m", "not slow and not gpu and not docker", *session.posargs, env=OFFLINE)


@nox.session(python=PYTHON)
def slow(session: nox.Session) -> None:
    """The slow tests: a 1 GB single-line file, the 75,000-row data set, kill-and-resume sweeps."""
    install_locked(session)
    session.run("pytest", "-m", "slow and not gpu", *session.posargs, env=OFFLINE)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff (lint + format check)."""
    session.install("ruff==0.17.6")
    _print_versions(session, "ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def smoke(session: nox.Session) -> None:
    """The whole loop on the tiny recipe (check, train, eval, package), then verify the bundle."""
    install_locked(session)
    work = Path(session.create_tmp()) / "smoke"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**OFFLINE, "FT_CACHE": str(Path(session.create_tmp()) / "ft-cache")}
    session.chdir(work)
    session.run("ft", "run", "--recipe", "tiny", "--set", "output.dir=runs", "--set", "output.bundle_dir=bundles", env=env)
    archives = sorted((work / "bundles").glob("*.tar.gz"))
    if not archives:
        session.error("smoke: ft run left no bundle archive")
    session.run("ft", "verify", str(archives[-1]), env=env)
    session.run("ft", "verify", str(archives[-1]).removesuffix(".tar.gz"), env=env)
