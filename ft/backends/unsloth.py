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

from ft.backends import Loaded, weights_info
from ft.errors import FtError

# Libraries Unsloth patches at import time; any of them loaded first defeats the patches.
PATCHED_BY_UNSLOTH = ("transformers", "trl", "peft")


def loaded_too_early() -> list[str]:
    return [name for name in PATCHED_BY_UNSLOTH if name in sys.modules]


def cuda_initialized() -> bool:
    """Whether this process has initialised CUDA (without importing torch to find out)."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


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
    if cuda_initialized():
        raise FtError(
            "train.backend: unsloth must be imported before CUDA is initialised, but this process has "
            "already initialised it",
            hint="call ft.backends.unsloth.import_unsloth() before anything asks torch.cuda for device facts "
            "or memory; Unsloth's import sets PYTORCH_ALLOC_CONF=expandable_segments:True, which torch "
            "reads only when it initialises CUDA",
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
    name = resolve_model_path(m.name_or_path)
    kwargs: dict[str, Any] = {
        "model_name": name,
        "max_seq_length": t.max_seq_length,
        "dtype": _dtype(settings),
        "load_in_4bit": _load_4bit(settings),
        "revision": m.revision,
        # Without it Unsloth's mapper swaps a Hub id for its own pre-quantised repo (Qwen/Qwen2.5-7B-Instruct
        # -> unsloth/Qwen2.5-7B-Instruct-bnb-4bit) and drops `revision` with a warning: other weights than
        # the hf backend's, an ignored pin, and an offline load that fails with only the original cached.
        "use_exact_model_name": True,
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
    loaded_from = getattr(getattr(model, "config", None), "_name_or_path", None)
    if loaded_from and str(loaded_from).rstrip("/").lower() != str(name).rstrip("/").lower():
        raise FtError(
            f"model.name_or_path: Unsloth loaded {loaded_from!r} instead of {m.name_or_path!r}; "
            "ft trains only the weights the recipe names",
            hint="this Unsloth version ignores use_exact_model_name; use train.backend: hf, or the "
            "Unsloth version of the lockfile",
        )
    return FastLanguageModel, model, unsloth_tokenizer


def gradient_checkpointing_mode(settings) -> str | bool:
    """Unsloth's offloaded checkpointing ("unsloth") when the recipe asks for checkpointing."""
    return "unsloth" if settings.train.gradient_checkpointing else False


def effective_gradient_checkpointing(model, settings) -> str | bool:
    """The checkpointing Unsloth really applies, as get_peft_model recorded it on the model.

    Unsloth's offloaded mode ("unsloth") falls back to standard checkpointing (True) when the model's
    max_seq_length is below 512 (unsloth/models/_utils.py, apply_unsloth_gradient_checkpointing: the
    offloading costs more than it saves there); patch_peft_model stores the outcome in
    `model._unsloth_gradient_checkpointing`. Where it is absent, the request stands.
    """
    value = getattr(model, "_unsloth_gradient_checkpointing", None)
    return gradient_checkpointing_mode(settings) if value is None else value


def _fn_name(fn) -> str:
    fn = getattr(fn, "func", fn)  # functools.partial (Unsloth's non-inplace MLP kernel for Cohere)
    return getattr(fn, "__name__", "") or ""


def _fused(obj, *attrs: str) -> bool:
    """Unsloth's fused LoRA kernels are apply_lora_qkv / apply_lora_o / apply_lora_mlp_* (fast_lora.py)."""
    return any("lora" in _fn_name(getattr(obj, attr, None)).lower() for attr in attrs)


def _base(proj):
    return getattr(proj, "base_layer", proj)


def _why_not_fused(layer, kernel: str, settings) -> str:
    """Why Unsloth left a layer's `kernel` on PEFT's own forward, from the conditions of its
    FastLlamaModel.patch_peft_model (unsloth/models/llama.py): every projection adapted, none with a bias,
    lora_dropout 0, a 16-bit (or 4-bit) base."""
    holder = layer.mlp if kernel == "mlp" else layer.self_attn
    names = {
        "qkv": ("q_proj", "k_proj", "v_proj"),
        "o": ("o_proj",),
        "mlp": ("gate_proj", "up_proj", "down_proj"),
    }
    projs = {n: getattr(holder, n, None) for n in names[kernel]}
    missing = [n for n, p in projs.items() if p is None or not hasattr(p, "lora_A")]
    if missing:
        return f"no LoRA adapter on {', '.join(missing)} (lora.target_modules)"
    biased = [n for n, p in projs.items() if getattr(_base(p), "bias", None) is not None]
    if biased:
        verb = "has" if len(biased) == 1 else "have"
        return f"{', '.join(biased)} {verb} a bias; Unsloth fuses only bias-free projections"
    if settings is not None and settings.lora.dropout > 0:
        return "lora.dropout > 0"
    return "Unsloth kept PEFT's forward (a 32-bit base, or a layout its kernels do not read)"


def fused_kernels(model, settings=None) -> dict[str, Any]:
    """Which of Unsloth's fused LoRA kernels run, counted over the decoder layers after get_peft_model.

    Read from the model, not from Unsloth's log line: that line counts a Qwen2 layer's QKV as patched
    although q/k/v carry a bias and keep PEFT's forward. `not_fused` says why a kernel is missing from
    some layers.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = list(getattr(getattr(inner, "model", None), "layers", None) or [])
    # A tiled MLP keeps its own forward and takes the kernel as `_unsloth_forward` (patch_peft_model).
    slots = {
        "qkv": ("self_attn", ("apply_qkv",)),
        "o": ("self_attn", ("apply_o",)),
        "mlp": ("mlp", ("forward", "_unsloth_forward")),
    }
    counts: dict[str, Any] = {"layers": len(layers)}
    not_fused: dict[str, str] = {}
    for kernel, (part, attrs) in slots.items():
        unfused = [layer for layer in layers if not _fused(getattr(layer, part, None), *attrs)]
        counts[kernel] = len(layers) - len(unfused)
        if unfused:
            not_fused[kernel] = _why_not_fused(unfused[0], kernel, settings)
    return {**counts, "not_fused": not_fused} if not_fused else counts


def _patched(model) -> dict[str, Any]:
    """Fused-kernel counts per kind (the benchmark's bare Unsloth loop records these too)."""
    return {k: v for k, v in fused_kernels(model).items() if k != "not_fused"}


def _dtype_name(model) -> str:
    dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else "unknown"


def load_for_training(settings, device: str) -> Loaded:
    if device != "cuda":
        raise FtError(
            "train.backend: unsloth needs a CUDA GPU; use train.backend: hf (or auto) on this machine"
        )
    import_unsloth()
    from ft.modelref import recipe_tokenizer

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
    tokenizer = recipe_tokenizer(settings)
    trainable, total = model.get_nb_trainable_parameters()
    kernels = fused_kernels(model, settings)
    requested = gradient_checkpointing_mode(settings)
    effective = effective_gradient_checkpointing(model, settings)
    info = {
        **_versions(),
        "weights": weights_info(model, settings),
        "trainable_params": trainable,
        "total_params": total,
        "gradient_checkpointing": effective,
        "patched": {k: v for k, v in kernels.items() if k != "not_fused"},
    }
    if effective != requested:
        info["gradient_checkpointing_requested"] = requested
    if kernels.get("not_fused"):
        info["not_fused"] = kernels["not_fused"]
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

    from ft.modelref import recipe_tokenizer

    fast, model, _ = _from_pretrained(settings, for_training=False)
    # Base + adapter explicitly (not the adapter directory), so a moved bundle does not depend on the
    # base path recorded inside adapter_config.json.
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    fast.for_inference(model)
    tokenizer = recipe_tokenizer(settings)
    quant = "nf4" if _load_4bit(settings) else "none"
    info = {**_versions(), "weights": weights_info(model, settings)}
    return Loaded(model, tokenizer, "unsloth", device, _dtype_name(model), quant, info=info)


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
