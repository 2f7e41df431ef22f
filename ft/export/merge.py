"""The LoRA adapter merged into its base: sharded safetensors + tokenizer + chat template + generation config.

The base is loaded from its original (unquantised) weights, never in 4-bit: a QLoRA adapter is merged
into the 16-bit weights its 4-bit base was quantised from, which is what the 4-bit base dequantises to
up to the quantisation error. The merge runs in the dtype the merged model is saved in: the recipe's
`model.dtype` when it is float32/float16/bfloat16, else bfloat16.
"""

from __future__ import annotations

from pathlib import Path

SHARD_SIZE = "2GB"


def merged_dtype(settings) -> str:
    return settings.model.dtype if settings.model.dtype in ("float32", "float16", "bfloat16") else "bfloat16"


def load_adapter_model(settings, adapter_dir: Path, dtype: str):
    """Base (unquantised, on CPU) + the adapter, as PEFT loads it; and the tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ft.modelref import adapter_tokenizer, resolve_model_path

    m = settings.model
    base = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(m.name_or_path),
        revision=m.revision,
        trust_remote_code=m.trust_remote_code,
        dtype=getattr(torch, dtype),
    )
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    model.eval()
    # The tokenizer the adapter was trained and saved with: its chat template goes into every export.
    return model, adapter_tokenizer(settings, adapter_dir)


def merge(settings, adapter_dir: Path, out_dir: Path, *, logit_prompts: list[str] = ()) -> dict:
    """Write the merged model to `out_dir` (existing, empty); returns facts for the manifest and, under
    `adapter_logits`, the adapter model's logits on `logit_prompts` (compared with the merged model's)."""
    from transformers.utils import logging as hf_logging

    from ft.export.check import logits

    dtype = merged_dtype(settings)
    model, tokenizer = load_adapter_model(settings, adapter_dir, dtype)
    adapter_logits = logits(model, tokenizer, list(logit_prompts))
    merged = model.merge_and_unload()
    hf_logging.disable_progress_bar()
    try:
        merged.save_pretrained(out_dir, safe_serialization=True, max_shard_size=SHARD_SIZE)
    finally:
        hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out_dir)
    return {
        "dtype": dtype,
        "parameters": sum(p.numel() for p in merged.parameters()),
        "base": settings.model.name_or_path,
        "base_revision": settings.model.revision,
        "adapter_logits": adapter_logits,
    }
