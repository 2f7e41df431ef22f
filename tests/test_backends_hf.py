"""The hf backend's choices that only a GPU would show: bf16 vs fp16 per card, against a fake torch.cuda at
torch 2.13's signature, and which weights it loads (repo, revision, and the commit they resolved to)."""

from __future__ import annotations

import types

import pytest


def fake_is_bf16_supported(major: int):
    """torch.cuda.is_bf16_supported(including_emulation=True) as torch 2.13 answers it on a card of compute
    capability `major`: native bf16 from Ampere (8.x); below that True only when counting emulation, which
    succeeds on Turing/Volta (T4, V100) because a bf16 tensor can be created there."""

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return major >= 8 or including_emulation

    return is_bf16_supported


@pytest.mark.parametrize(
    "card, major, dtype", [("T4", 7, "float16"), ("V100", 7, "float16"), ("A100", 8, "bfloat16")]
)
def test_auto_dtype_is_float16_where_bf16_is_only_emulated(tiny_settings, monkeypatch, card, major, dtype):
    import torch

    from ft.backends import hf

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake_is_bf16_supported(major))
    s = tiny_settings(**{"model.dtype": "auto"})
    assert hf.resolve_dtype(s, "cuda") is getattr(torch, dtype), card
    assert hf.resolve_dtype(s, "cpu") is torch.float32


def test_hf_loads_the_named_revision_and_records_the_commit(tiny_settings, tiny_model_dir, monkeypatch):
    import transformers

    from ft.backends import hf

    real = transformers.AutoModelForCausalLM.from_pretrained
    seen = {}
    commit = "7ae557604adf67be50417f59c2c2f167def9a775"

    def from_pretrained(path, **kwargs):
        seen.update(kwargs, path=path)
        model = real(str(tiny_model_dir), dtype=kwargs["dtype"])
        model.config._commit_hash = commit  # what transformers records for a Hub snapshot
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    s = tiny_settings(**{"model.revision": "v1.0"})
    loaded = hf.load_for_training(s, "cpu")
    assert seen["revision"] == "v1.0" and seen["path"] == str(tiny_model_dir)
    assert loaded.info["weights"] == {
        "name_or_path": "builtin:tiny-qwen2",
        "revision": "v1.0",
        "commit": commit,
    }
    assert loaded.info["gradient_checkpointing"] is False  # the tiny recipe

    monkeypatch.setattr("peft.PeftModel.from_pretrained", lambda model, *a, **k: model)
    evaluated = hf.load_for_eval(s, "adapter", "cpu")
    assert evaluated.info["weights"] == loaded.info["weights"]


def test_a_local_directory_has_no_commit(tiny_settings):
    from ft.backends import weights_info

    model = types.SimpleNamespace(config=types.SimpleNamespace(_commit_hash=None))
    assert weights_info(model, tiny_settings())["commit"] is None
