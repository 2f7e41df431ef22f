"""The plain backend: transformers + peft, with bitsandbytes NF4 (QLoRA) on CUDA.

On CPU the base is loaded in fp32 and LoRA trains in fp32 (bitsandbytes' 4-bit kernels need CUDA).
"""

from __future__ import annotations

from pathlib import Path

from ft.backends import Loaded, weights_info
from ft.errors import FtError
from ft.modelref import _not_found, recipe_tokenizer, resolve_model_path
from ft.train import distributed


def resolve_dtype(settings, device: str):
    import torch

    name = settings.model.dtype
    if name == "auto":
        if device != "cuda":
            return torch.float32
        # Without including_emulation=False, torch counts bf16 that Turing/Volta (T4, V100) only emulate.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return getattr(torch, name)


def resolve_quantization(settings, device: str) -> str:
    q = settings.model.quantization
    if q == "auto":
        return "nf4" if device == "cuda" else "none"
    if q == "nf4" and device != "cuda":
        raise FtError(
            "model.quantization: nf4 needs a CUDA GPU; set model.quantization: none to train on CPU"
        )
    return q


def _load_base(settings, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(settings, device)
    quant = resolve_quantization(settings, device)
    kwargs: dict = {
        "dtype": dtype,
        "revision": settings.model.revision,
        "trust_remote_code": settings.model.trust_remote_code,
    }
    if quant == "nf4":
        try:
            from transformers import BitsAndBytesConfig
        except ImportError as exc:  # pragma: no cover - bitsandbytes ships in the CUDA image
            raise FtError("model.quantization: nf4 needs bitsandbytes (`pip install ft[gpu]`)") from exc
        fsdp = distributed.mode(settings) == "fsdp"
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # FSDP shards float tensors only and wraps a layer whole only when its dtypes agree, so
            # FSDP-QLoRA stores the 4-bit weights in the compute dtype (bitsandbytes' FSDP-QLoRA guide).
            **({"bnb_4bit_quant_storage": dtype} if fsdp else {}),
        )
        if not fsdp:  # FSDP places (and shards) the weights itself
            kwargs["device_map"] = {"": distributed.local_rank()}  # this rank's GPU (0 for one process)
    path = resolve_model_path(settings.model.name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise _not_found(settings.model.name_or_path, exc) from None
    if quant == "none" and device == "cuda" and distributed.mode(settings) != "fsdp":
        model.to(f"cuda:{distributed.local_rank()}")
    model.config.use_cache = False
    return model, str(dtype).removeprefix("torch."), quant, torch


def load_for_training(settings, device: str) -> Loaded:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model, dtype, quant, _ = _load_base(settings, device)
    tokenizer = recipe_tokenizer(settings)
    if quant == "nf4" and distributed.mode(settings) == "fsdp":
        # FSDP-QLoRA keeps every weight in the one storage dtype (prepare_model_for_kbit_training would
        # upcast the norms to fp32), as bitsandbytes' FSDP-QLoRA guide loads it; get_peft_model freezes the base.
        if settings.train.gradient_checkpointing:
            model.enable_input_require_grads()
    elif quant == "nf4":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.train.gradient_checkpointing
        )
    missing = sorted(
        set(settings.lora.target_modules) - {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    )
    if missing:
        raise FtError(f"lora.target_modules: {', '.join(missing)} not found in {settings.model.name_or_path}")
    lora = LoraConfig(
        r=settings.lora.r,
        lora_alpha=settings.lora.alpha,
        lora_dropout=settings.lora.dropout,
        target_modules=list(settings.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()
    return Loaded(
        model,
        tokenizer,
        "hf",
        device,
        dtype,
        quant,
        info={
            "weights": weights_info(model, settings),
            "trainable_params": trainable,
            "total_params": total,
            "gradient_checkpointing": bool(settings.train.gradient_checkpointing),
        },
    )


def load_for_eval(settings, adapter_dir: str | Path, device: str) -> Loaded:
    from peft import PeftModel

    model, dtype, quant, _ = _load_base(settings, device)
    tokenizer = recipe_tokenizer(settings)
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    model.eval()
    return Loaded(
        model, tokenizer, "hf", device, dtype, quant, info={"weights": weights_info(model, settings)}
    )


def trainer_class():
    from trl import SFTTrainer

    return SFTTrainer
