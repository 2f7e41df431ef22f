"""Model backends behind one small interface.

Each backend module provides:

    load_for_training(settings, device) -> Loaded   # base model (4-bit on CUDA) + a fresh LoRA adapter
    load_for_eval(settings, adapter_dir, device) -> Loaded  # base + the trained adapter, eval mode
    trainer_class() -> type                          # the SFTTrainer class to drive (TRL's, or patched)

`hf` is transformers + peft (+ bitsandbytes NF4 on CUDA); `unsloth` is Unsloth's FastLanguageModel,
which must be imported before transformers/peft/trl and never on a machine without a GPU. Choosing a
backend therefore happens here, before any of those imports: a command that will train or evaluate
calls `prepare(settings)` first, which picks the backend from the model's config.json read as plain JSON
and, when it is Unsloth, imports Unsloth there and then.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
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


def weights_info(model, settings) -> dict[str, Any]:
    """Which weights a backend loaded: the repo (or directory) and revision the recipe names, and the Hub
    commit they resolved to, which transformers records on the config (`_commit_hash`; None for a local
    directory outside the Hugging Face cache). Goes into the run's record with the backend's info."""
    config = getattr(model, "config", None)
    commit = getattr(config, "_commit_hash", None)
    return {
        "name_or_path": settings.model.name_or_path,
        "revision": settings.model.revision,
        "commit": commit if isinstance(commit, str) else None,
    }


def choose(settings, device: str, model_type: str | None) -> tuple[str, str]:
    """Pick the backend for this run; returns (name, reason) and the reason goes into the run manifest."""
    from ft.train.distributed import world_size

    wanted = settings.train.backend
    unsloth_installed = importlib.util.find_spec("unsloth") is not None
    if wanted == "hf":
        return "hf", "requested (train.backend: hf)"
    nproc = world_size()
    if nproc > 1:  # Unsloth is the single-GPU fast path; several processes go through transformers+peft
        if wanted == "unsloth":
            raise FtError(
                f"train.backend: unsloth trains on one GPU only, but this run has {nproc} processes; "
                "use train.backend: hf (or auto) under torchrun/accelerate launch"
            )
        return "hf", f"auto: {nproc} processes (torchrun/accelerate launch); Unsloth trains on one GPU only"
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


def model_type_of(name_or_path: str, revision: str | None = None) -> str | None:
    """`model_type` from a model's config.json without importing transformers (or torch).

    builtin:tiny-qwen2 is a Qwen2; a local directory's config.json is read as JSON; a Hub id's config.json
    comes from the local Hugging Face cache, or is downloaded through huggingface_hub (which Unsloth does not
    patch) unless offline. None when it cannot be known.
    """
    from ft.modelref import is_builtin, offline

    if is_builtin(name_or_path):
        return "qwen2"
    path = Path(name_or_path).expanduser()
    config: Path | None = path / "config.json" if path.is_dir() else None
    if config is None:
        try:
            from huggingface_hub import hf_hub_download, try_to_load_from_cache
        except ImportError:  # pragma: no cover - a dependency of transformers
            return None
        cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
        if isinstance(cached, str):
            config = Path(cached)
        elif not offline():
            try:
                config = Path(hf_hub_download(name_or_path, "config.json", revision=revision))
            except Exception:  # noqa: BLE001 - loading the model later reports the real problem
                return None
    if config is None or not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    text = data.get("text_config") if isinstance(data.get("text_config"), dict) else {}
    return data.get("model_type") or text.get("model_type")


def prepare(settings, *, device: str | None = None, backend: str | None = None) -> tuple[str, str, str]:
    """Decide the device and backend of a command that will train or evaluate, before anything heavy.

    Call it first in such a command: when the backend is Unsloth it is imported here, so that it comes
    before transformers, trl and peft in this process (the data check loads a tokenizer, which imports
    transformers). `backend` forces a backend (an existing run's, for evaluation). Returns
    (device, backend, reason).
    """
    device = device or settings.resolved_device()
    if backend is not None:
        name, reason = backend, f"recorded ({backend})"
    else:
        # The architecture only matters for `auto` on CUDA; elsewhere nothing is looked up.
        needs_type = device == "cuda" and settings.train.backend == "auto"
        model_type = (
            model_type_of(settings.model.name_or_path, settings.model.revision) if needs_type else None
        )
        name, reason = choose(settings, device, model_type)
    if name == "unsloth" and device == "cuda":
        from ft.backends.unsloth import import_unsloth

        import_unsloth()
    return device, name, reason


def get(name: str) -> ModuleType:
    if name == "unsloth":
        from ft.backends import unsloth as module
    elif name == "hf":
        from ft.backends import hf as module
    else:  # pragma: no cover - guarded by the settings' Literal
        raise FtError(f"train.backend: unknown backend {name!r}")
    return module
