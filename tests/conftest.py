"""Shared test fixtures: a hermetic, offline environment and the tiny model built once per session.

- Hugging Face libraries are forced offline before anything imports them, so a test that tried to
  download would fail instead of silently reaching the network.
- `FT_CACHE` points at a per-session temporary directory, so tests never write to ~/.cache/ft; the
  tiny model is built there once (`tiny_model_dir`) and `builtin:tiny-qwen2` (the `tiny` recipe)
  resolves to that same directory, so CLI-level tests reuse it too.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session", autouse=True)
def ft_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private FT_CACHE for the whole session (the tiny model is built into it on first use)."""
    path = tmp_path_factory.mktemp("ft-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FT_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def tiny_model_dir(ft_cache: Path) -> Path:
    """The tiny offline Qwen2 (random weights, freshly trained tokenizer), built once per session."""
    from ft.testing import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    """The tiny model's fast tokenizer with its ChatML template."""
    from ft.modelref import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def tiny_settings(tiny_model_dir: Path):
    """`tiny_settings(**overrides)` -> Settings of the `tiny` recipe with dotted overrides.

    Labels are off unless a test turns them on, so rows need not be ticket JSON:
        settings = tiny_settings(**{"data.train": [str(path)], "data.too_long": "error"})
    """
    from ft.config import load_settings

    def make(**overrides):
        base = {"data.label_field": None, "data.labels": None}
        merged = {**base, **overrides}
        return load_settings("tiny", _nested(merged))

    return make


def _nested(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out
