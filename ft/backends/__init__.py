"""Model backends behind one small interface.

Each backend module provides:

    load_for_training(settings, device) -> Loaded   # base model (4-bit on CUDA) + a fresh LoRA adapter
    load_for_eval(settings, adapter_dir, device) -> Loaded  # base + the trained adapter, eval mode
    trainer_class() -> type                          # the SFTTrainer class to drive (TRL's, or patched)

`hf` is transformers + peft (+ bitsandbytes NF4 on CUDA); `unsloth` is Unsloth's FastLanguageModel,
which must be imported before transformers/peft/trl and never on a machine without a GPU. Choosing a
backend therefore happens here, before any of those imports.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from ft.errors import FtError

# Architectures Unsloth's FastLanguageModel patches (model_type in config.json).
UNSLOTH_ARCHITECTURES = {
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "phi3",
    "granite",
    "cohere",
}


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    backend: str
    device: str
    dtype: str
    quantization: str
    info: dict[str, Any] = field(default_factory=dict)


def choose(settings, device: str, model_type: str | None) -> tuple[str, str]:
    """Pick the backend for this run; returns (name, reason) and the reason goes into the run manifest."""
    wanted = settings.train.backend
    unsloth_installed = importlib.util.find_spec("unsloth") is not None
    if wanted == "hf":
        return "hf", "requested (train.backend: hf)"
    if wanted == "unsloth":
        if device != "cuda":
            raise FtError(
                "train.backend: unsloth needs a CUDA GPU; use train.backend: hf (or auto) on this machine"
            )
        if not unsloth_installed:
            raise FtError(
                "train.backend: unsloth is not installed; use the CUDA image or `pip install ft[gpu]`"
            )
        return "unsloth", "requested (train.backend: unsloth)"
    if device != "cuda":
        return "hf", "auto: no CUDA GPU, Unsloth needs one"
    if not unsloth_installed:
        return "hf", "auto: unsloth is not installed"
    if model_type not in UNSLOTH_ARCHITECTURES:
        return "hf", f"auto: Unsloth does not support the {model_type!r} architecture"
    return "unsloth", f"auto: CUDA GPU and a supported architecture ({model_type})"


def get(name: str) -> ModuleType:
    if name == "unsloth":
        from ft.backends import unsloth as module
    elif name == "hf":
        from ft.backends import hf as module
    else:  # pragma: no cover - guarded by the settings' Literal
        raise FtError(f"train.backend: unknown backend {name!r}")
    return module
