"""The fast backend: Unsloth's FastLanguageModel (4-bit base, fused LoRA kernels, offloaded checkpointing).

Two rules shape this module:
- Unsloth patches transformers, peft and trl when it is imported, so it must be imported before any of
  them in the process. `import_unsloth()` checks `sys.modules` and refuses, with an explanation, when
  one of them is already loaded (Unsloth itself would only warn and then train slower or differently).
- Unsloth refuses to import without a GPU, so nothing here imports it at module level: this module can
  be imported (and tested) on any machine, and only the functions below touch Unsloth.

The adapter is saved by the trainer in plain PEFT format, so the hf backend and
`peft.PeftModel.from_pretrained` load it too.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from ft.backends import Loaded
from ft.errors import FtError

# Libraries Unsloth patches at import time; any of them loaded first defeats the patches.
PATCHED_BY_UNSLOTH = ("transformers", "trl", "peft")


def loaded_too_early() -> list[str]:
    return [name for name in PATCHED_BY_UNSLOTH if name in sys.modules]


def import_unsloth() -> ModuleType:
    """Import Unsloth (once per process), first, on a CUDA machine; FtError otherwise."""
    if "unsloth" in sys.modules:
        return sys.modules["unsloth"]
    from ft.manifest import cuda_available

    if not cuda_available():
        raise FtError(
            "train.backend: unsloth needs a CUDA GPU; use train.backend: hf (or auto) on this machine"
        )
    early = loaded_too_early()
    if early:
        raise FtError(
            f"train.backend: unsloth must be imported before {', '.join(PATCHED_BY_UNSLOTH)}, but "
            f"{', '.join(early)} {'is' if len(early) == 1 else 'are'} already loaded in this process",
            hint="call ft.backends.unsloth.import_unsloth() at the start of the command, before loading the "
            "tokenizer or any model; Unsloth patches these libraries when it is imported",
        )
    try:
        import unsloth
    except ImportError as exc:
        raise FtError(
            "train.backend: unsloth is not installed; use the CUDA image or `pip install ft[gpu]`"
        ) from exc
    except NotImplementedError as exc:  # "Unsloth cannot find any torch accelerator"
        raise FtError(f"train.backend: unsloth cannot use this machine's GPU: {exc}") from exc
    return unsloth


def _versions() -> dict[str, str | None]:
    out = {}
    for dist in ("unsloth", "unsloth_zoo"):
        try:
            out[dist] = metadata.version(dist.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _dtype(settings):
    """None lets Unsloth choose (bfloat16 where supported, else float16), like the hf backend's `auto`."""
    import torch

    return None if settings.model.dtype == "auto" else getattr(torch, settings.model.dtype)


def _load_4bit(settings) -> bool:
    q = settings.model.quantization
    return q in ("auto", "nf4")


def _from_pretrained(settings, *, for_training: bool):
    from unsloth import FastLanguageModel

    from ft.modelref import resolve_model_path

    m, t = settings.model, settings.train
    kwargs: dict[str, Any] = {
        "model_name": resolve_model_path(m.name_or_path),
        "max_seq_length": t.max_seq_length,
        "dtype": _dtype(settings),
        "load_in_4bit": _load_4bit(settings),
        "revision": m.revision,
        "trust_remote_code": m.trust_remote_code,
        "random_state": t.seed,
    }
    if for_training:
        kwargs["use_gradient_checkpointing"] = gradient_checkpointing_mode(settings)
    try:
        model, unsloth_tokenizer = FastLanguageModel.from_pretrained(**kwargs)
    except OSError as exc:
        from ft.modelref import _not_found

        raise _not_found(m.name_or_path, exc) from None
    return FastLanguageModel, model, unsloth_tokenizer


def gradient_checkpointing_mode(settings) -> str | bool:
    """Unsloth's offloaded checkpointing ("unsloth") when the recipe asks for checkpointing."""
    return "unsloth" if settings.train.gradient_checkpointing else False


def _patched(model) -> dict[str, Any]:
    """What Unsloth's fast paths took over: counted from the decoder layers it rewired."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(inner, "model", None), "layers", None) or []

    def uses(obj, attr: str) -> bool:
        fn = getattr(obj, attr, None)
        return "lora" in getattr(fn, "__name__", "").lower()

    return {
        "layers": len(layers),
        "qkv": sum(uses(layer.self_attn, "apply_qkv") for layer in layers),
        "o": sum(uses(layer.self_attn, "apply_o") for layer in layers),
        "mlp": sum(uses(layer.mlp, "forward") for layer in layers),
    }


def _dtype_name(model) -> str:
    dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else "unknown"


def load_for_training(settings, device: str) -> Loaded:
    if device != "cuda":
        raise FtError(
            "train.backend: unsloth needs a CUDA GPU; use train.backend: hf (or auto) on this machine"
        )
    import_unsloth()
    from ft.modelref import load_tokenizer

    fast, model, _ = _from_pretrained(settings, for_training=True)
    lo = settings.lora
    model = fast.get_peft_model(
        model,
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=list(lo.target_modules),
        bias="none",
        use_gradient_checkpointing=gradient_checkpointing_mode(settings),
        random_state=settings.train.seed,
        use_rslora=False,
        loftq_config=None,
    )
    # ft's own tokenizer (pad token, chat template) so the data was encoded exactly as the hf backend would.
    tokenizer = load_tokenizer(
        settings.model.name_or_path, settings.model.revision, settings.model.trust_remote_code
    )
    trainable, total = model.get_nb_trainable_parameters()
    info = {
        **_versions(),
        "trainable_params": trainable,
        "total_params": total,
        "gradient_checkpointing": gradient_checkpointing_mode(settings),
        "patched": _patched(model),
    }
    if settings.lora.dropout > 0:
        info["note"] = "lora.dropout > 0 keeps Unsloth off its fused LoRA kernels (slower)"
    quant = "nf4" if _load_4bit(settings) else "none"
    return Loaded(model, tokenizer, "unsloth", device, _dtype_name(model), quant, info=info)


def load_for_eval(settings, adapter_dir: str | Path, device: str) -> Loaded:
    """The base through Unsloth plus the trained adapter, switched to Unsloth's inference mode."""
    if device != "cuda":
        raise FtError(
            "train.backend: unsloth needs a CUDA GPU; evaluate with train.backend: hf on this machine"
        )
    import_unsloth()
    from peft import PeftModel

    from ft.modelref import load_tokenizer

    fast, model, _ = _from_pretrained(settings, for_training=False)
    # Base + adapter explicitly (not the adapter directory), so a moved bundle does not depend on the
    # base path recorded inside adapter_config.json.
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    fast.for_inference(model)
    tokenizer = load_tokenizer(
        settings.model.name_or_path, settings.model.revision, settings.model.trust_remote_code
    )
    quant = "nf4" if _load_4bit(settings) else "none"
    return Loaded(model, tokenizer, "unsloth", device, _dtype_name(model), quant, info=_versions())


_TRAINER_CLASS: type | None = None


def trainer_class():
    """TRL's SFTTrainer, imported after Unsloth (so Unsloth's trainer patches apply), with the SFTConfig
    fields of `sft_config_overrides` applied to whatever config it is given: `ft train`, `ft size --probe`
    and the benchmark all build the config the hf way, and this keeps them on Unsloth's own settings."""
    global _TRAINER_CLASS
    import_unsloth()
    from trl import SFTTrainer

    if _TRAINER_CLASS is None or not issubclass(_TRAINER_CLASS, SFTTrainer):

        class FtUnslothTrainer(SFTTrainer):
            def __init__(self, *args, **kwargs):
                config = kwargs.get("args")
                if config is not None:
                    for key, value in sft_config_overrides(config).items():
                        setattr(config, key, value)
                super().__init__(*args, **kwargs)

        _TRAINER_CLASS = FtUnslothTrainer
    return _TRAINER_CLASS


def sft_config_overrides(config_or_settings) -> dict[str, Any]:
    """SFTConfig fields this backend needs different from the hf backend's.

    Checkpointing stays as the recipe asks (Unsloth's trainer calls `model.for_training(
    use_gradient_checkpointing=args.gradient_checkpointing)`, so False here would switch Unsloth's own
    checkpointing off), but with no `gradient_checkpointing_kwargs`: the hf backend asks for
    `use_reentrant=False`, and Unsloth's offloaded checkpointing is built on the reentrant path. These are
    Unsloth's own SFTConfig defaults, what its examples (and the benchmark's bare loop) run with.
    """
    train = getattr(config_or_settings, "train", None)
    on = train.gradient_checkpointing if train is not None else config_or_settings.gradient_checkpointing
    return {"gradient_checkpointing": bool(on), "gradient_checkpointing_kwargs": None}
