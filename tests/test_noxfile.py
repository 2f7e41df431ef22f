"""The test sessions install the CPU lock from a local wheel folder, or else from PyTorch's CPU index."""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock_install = _load(ROOT / "env" / "lock_install.py", "ft_env_lock_install")


@functools.cache
def _noxfile():
    """Loaded once: each load registers the sessions with nox again."""
    return _load(ROOT / "noxfile.py", "ft_noxfile")


@pytest.mark.parametrize("installer", ["pip", "uv"])
def test_local_wheel_folder_is_the_only_extra_source(installer):
    args = lock_install.cpu_lock_install_args(
        "lockfiles/cpu.txt", find_links_env="/srv/wheels /srv/more", installer=installer
    )
    assert args == [
        "--require-hashes",
        "--no-deps",
        "--find-links",
        "/srv/wheels",
        "--find-links",
        "/srv/more",
        "-r",
        "lockfiles/cpu.txt",
    ]


@pytest.mark.parametrize("value", [None, "", "  "])
def test_without_a_wheel_folder_pip_asks_pytorchs_cpu_index(value):
    args = lock_install.cpu_lock_install_args("lockfiles/cpu.txt", find_links_env=value, installer="pip")
    assert args == [
        "--require-hashes",
        "--no-deps",
        "--extra-index-url",
        "https://download.pytorch.org/whl/cpu",
        "-r",
        "lockfiles/cpu.txt",
    ]


def test_without_a_wheel_folder_uv_looks_at_every_index():
    args = lock_install.cpu_lock_install_args("lockfiles/cpu.txt", find_links_env=None, installer="uv")
    assert args == [
        "--require-hashes",
        "--no-deps",
        "--extra-index-url",
        "https://download.pytorch.org/whl/cpu",
        "--index-strategy",
        "unsafe-best-match",
        "-r",
        "lockfiles/cpu.txt",
    ]


def test_unknown_installer_is_refused():
    with pytest.raises(ValueError):
        lock_install.cpu_lock_install_args("x.txt", find_links_env=None, installer="conda")


class _Session:
    """What install_locked() uses of a nox session; records the install commands."""

    def __init__(self, backend: str):
        self.venv_backend = backend
        self.installs: list[tuple[str, ...]] = []
        self.envs: list[dict[str, str] | None] = []

    def install(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.installs.append(args)
        self.envs.append(env)

    def error(self, message: str):
        raise AssertionError(message)


@pytest.mark.parametrize(
    ("backend", "links", "expected"),
    [
        ("uv", "/srv/wheels", ["--find-links", "/srv/wheels"]),
        ("virtualenv", "/srv/wheels", ["--find-links", "/srv/wheels"]),
        (
            "uv",
            None,
            [
                "--extra-index-url",
                "https://download.pytorch.org/whl/cpu",
                "--index-strategy",
                "unsafe-best-match",
            ],
        ),
        ("virtualenv", None, ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]),
    ],
)
def test_noxfile_installs_the_lock_with_these_arguments(monkeypatch, backend, links, expected):
    """install_locked() itself, on a recorded session (nox is a dev tool: skipped where it is absent)."""
    pytest.importorskip("nox")
    if links is None:
        monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    else:
        monkeypatch.setenv("PIP_FIND_LINKS", links)
    session = _Session(backend)
    _noxfile().install_locked(session)
    lock = str(ROOT / "lockfiles" / "cpu.txt")
    assert session.installs == [
        ("--require-hashes", "--no-deps", *expected, "-r", lock),
        ("--no-deps", "-e", "."),
    ]
    # llama-cpp-python's sdist is built portable (no -march=native), as in the image
    assert "-DGGML_NATIVE=OFF" in session.envs[0]["CMAKE_ARGS"]


def test_lock_pins_torch_cpu_build_with_a_hash():
    """The hash the index case relies on: one `+cpu` pin, hash-checked (see the README's install notes)."""
    text = (ROOT / "lockfiles" / "cpu.txt").read_text(encoding="utf-8")
    entry = re.search(r"^torch==(\S+) \\\n((?:\s+--hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", text, re.M)
    assert entry, "lockfiles/cpu.txt has no hashed torch pin"
    assert entry.group(1).endswith("+cpu")
