"""llama.cpp is pinned once: the sdist ft.export.llamacpp unpacks the converter from is the one every lock
pins, and the pyproject `export` extra and env/*.in agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

from ft.export import llamacpp

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flavour", ["cpu", "cu128", "cu130"])
def test_every_lock_pins_the_same_llama_cpp_sdist(flavour):
    text = (ROOT / "lockfiles" / f"{flavour}.txt").read_text(encoding="utf-8")
    m = re.search(r"^llama-cpp-python==(\S+) \\\n((?:\s+--hash=sha256:\w+ ?\\?\n)+)", text, re.M)
    assert m, f"{flavour}: llama-cpp-python is not in the lock"
    assert m.group(1) == llamacpp.VERSION
    assert re.findall(r"sha256:(\w+)", m.group(2)) == [llamacpp.SDIST_SHA256]
    for name in ("sentencepiece", "protobuf", "huggingface-hub", "diskcache"):
        assert re.search(rf"^{name}==", text, re.M), f"{flavour}: {name} missing"


def test_pyproject_extra_and_env_in_files_agree():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["export"]
    for flavour in ("cpu", "cu128", "cu130"):
        lines = [
            line.split("#")[0].strip()
            for line in (ROOT / "env" / f"{flavour}.in").read_text().splitlines()
            if line.split("#")[0].strip()
        ]
        for pin in extra:
            assert pin in lines, f"env/{flavour}.in lacks {pin}"


def test_install_refuses_a_sdist_with_another_hash(tmp_path):
    fake = tmp_path / llamacpp.SDIST_NAME
    fake.write_bytes(b"not the sdist")
    from ft.errors import FtError

    with pytest.raises(FtError, match="sha256"):
        llamacpp.install(fake)
