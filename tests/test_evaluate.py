"""Eval's memory: the held-out loss without full logits, the generation batch from the sizing model and
its step-down on an out-of-memory, and inputs placed where the model's embeddings are. CPU, tiny model."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from ft.eval import evaluate as ev
from ft.eval import loss as eval_loss


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    """The tiny Qwen2 with a LoRA adapter whose B matrices are non-zero (so tuned differs from base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    return model.eval()


def _rows(vocab: int, n: int = 5, seed: int = 0) -> list[dict]:
    """Rows of different lengths; the first part of each is prompt (label -100), as encode() makes them."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randrange(6, 30)
        ids = [rng.randrange(vocab) for _ in range(length)]
        cut = rng.randrange(1, length - 1)
        rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return rows


def _old_full_logits_loss(model, rows, pad, batch_size):
    """The computation eval used before: whole-batch logits in fp32, shifted cross-entropy."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        ids, labels, mask = eval_loss.batch_tensors(rows[i : i + batch_size], pad, "cpu")
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        total += torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), reduction="sum"
        ).item()
        count += int((shift_labels != -100).sum())
    return total / count


class _Tok:
    pad_token_id = 0


def _record_logits(model, monkeypatch, chunk_tokens: int):
    """Cap a logits chunk at `chunk_tokens` and record the largest LM-head output (in tokens)."""
    head = model.get_base_model().get_output_embeddings()
    vocab = head.weight.shape[0]
    monkeypatch.setattr(eval_loss, "LOGITS_CHUNK_BYTES", 4 * vocab * chunk_tokens)
    seen: list[int] = []
    handle = head.register_forward_hook(lambda mod, args, out: seen.append(out.numel() // vocab))
    return seen, handle, vocab


def test_eval_loss_matches_full_logits_and_never_builds_them(tiny_lm, monkeypatch):
    seen, handle, vocab = _record_logits(tiny_lm, monkeypatch, chunk_tokens=7)
    rows = _rows(vocab)
    results = {}
    try:
        for adapter in (False, True):
            with tiny_lm.disable_adapter() if not adapter else contextlib.nullcontext():
                seen.clear()
                got = ev._eval_loss(tiny_lm, _Tok, rows, batch_size=3)
                # Full logits would be 3 rows x up to 29 positions: no LM-head output exceeds the chunk.
                assert seen and max(seen) <= 7
                assert got == pytest.approx(_old_full_logits_loss(tiny_lm, rows, 0, 3), rel=1e-5, abs=1e-6)
                results[adapter] = got
    finally:
        handle.remove()
    assert results[False] != pytest.approx(results[True])  # the adapter is on or off as asked


def test_other_architectures_take_the_per_row_path_with_the_same_result(tiny_lm, monkeypatch):
    monkeypatch.setattr(eval_loss, "PLAIN_HEAD", frozenset())
    seen, handle, vocab = _record_logits(tiny_lm, monkeypatch, chunk_tokens=7)
    rows = _rows(vocab, seed=1)
    try:
        got = ev._eval_loss(tiny_lm, _Tok, rows, batch_size=4)
    finally:
        handle.remove()
    assert got == pytest.approx(_old_full_logits_loss(tiny_lm, rows, 0, 4), rel=1e-5, abs=1e-6)
    assert max(seen) <= max(len(r["input_ids"]) for r in rows)  # one row's logits at most


def test_rows_without_targets_count_nothing(tiny_lm):
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}, *_rows(100, n=2)]
    with_empty = ev._eval_loss(tiny_lm, _Tok, rows, batch_size=1)
    assert with_empty == pytest.approx(ev._eval_loss(tiny_lm, _Tok, rows[1:], batch_size=1))


# -- generation: step-down on OOM, device -----------------------------------------------------------------
PROMPTS = [f"<|im_start|>user\nsay {w}<|im_end|>\n<|im_start|>assistant\n" for w in "abcdefgh"]


def test_generation_steps_down_on_an_out_of_memory(tiny_lm, tiny_tokenizer, monkeypatch):
    want, size = ev._generate(tiny_lm, tiny_tokenizer, PROMPTS, 4, 2, "eval base")
    assert size == 2
    real = type(tiny_lm).generate
    seen: list[int] = []

    def generate(self, **kw):
        seen.append(kw["input_ids"].shape[0])
        if kw["input_ids"].shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB (injected)")
        return real(self, **kw)

    monkeypatch.setattr(type(tiny_lm), "generate", generate)
    steps: list[dict] = []
    got, size = ev._generate(tiny_lm, tiny_tokenizer, PROMPTS, 4, 8, "eval base", steps)
    assert got == want and size == 2
    assert seen == [8, 4, 2, 2, 2, 2]
    assert [s["batch_size"] for s in steps] == [8, 4]
    assert steps[0]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert tiny_tokenizer.padding_side == "right"


def test_generation_out_of_memory_at_batch_one_is_one_clear_error(tiny_lm, tiny_tokenizer, monkeypatch):
    from ft.errors import FtError

    def generate(self, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(type(tiny_lm), "generate", generate)
    with pytest.raises(FtError, match="eval tuned: out of memory even one row at a time"):
        ev._generate(tiny_lm, tiny_tokenizer, PROMPTS[:2], 4, 2, "eval tuned")
    assert tiny_tokenizer.padding_side == "right"


def test_loss_steps_down_on_an_out_of_memory(tiny_lm, monkeypatch):
    real = eval_loss.batch_loss
    sizes: list[int] = []

    def batch_loss(model, rows, pad):
        sizes.append(len(rows))
        if len(rows) > 1:
            raise RuntimeError("CUDA error: out of memory")
        return real(model, rows, pad)

    rows = _rows(100, n=3)
    want = ev._eval_loss(tiny_lm, _Tok, rows, batch_size=1)
    monkeypatch.setattr(ev, "batch_loss", batch_loss)
    steps: list[dict] = []
    assert ev._eval_loss(tiny_lm, _Tok, rows, batch_size=4, steps=steps) == want
    assert sizes == [3, 2, 1, 1, 1] and [(s["phase"], s["batch_size"]) for s in steps] == [
        ("loss", 4),
        ("loss", 2),
    ]


class _Embedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(4, 2))


class _FirstParamElsewhere(torch.nn.Module):
    """A model whose first parameter is on the meta device while its input embeddings are on the CPU (as
    when Unsloth or a device map places layers elsewhere than embed_tokens)."""

    def __init__(self):
        super().__init__()
        self.elsewhere = torch.nn.Parameter(torch.empty(3, device="meta"))
        self.embed = _Embedding()
        self.devices: list[torch.device] = []

    def get_input_embeddings(self):
        return self.embed

    def generate(self, input_ids, attention_mask, **kw):
        self.devices.append(input_ids.device)
        return torch.cat([input_ids, torch.full_like(input_ids[:, :1], 100)], dim=1)


def test_inputs_go_where_the_input_embeddings_are(tiny_tokenizer):
    model = _FirstParamElsewhere()
    assert next(model.parameters()).device.type == "meta"
    out, _ = ev._generate(model, tiny_tokenizer, PROMPTS[:3], 1, 2, "eval base")
    assert len(out) == 3
    assert [d.type for d in model.devices] == ["cpu", "cpu"]
    assert eval_loss.input_device(model).type == "cpu"


# -- the eval batch from the sizing model ---------------------------------------------------------------
def test_eval_batch_is_sized_against_free_gpu_memory(tiny_lm, tiny_tokenizer, tiny_settings, monkeypatch):
    from ft import sizing

    settings = tiny_settings(**{"eval.batch_size": 16, "eval.max_new_tokens": 32})
    assert ev._eval_batch(tiny_lm, tiny_tokenizer, PROMPTS, settings, "cpu")[0] == 16
    shape = sizing.load_shape(tiny_lm.get_base_model().config)
    longest = max(len(tiny_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS)
    kw = {"prompt_tokens": longest, "new_tokens": 32, "loss_tokens": settings.train.max_seq_length}
    per = {b: sizing.eval_transient_bytes(shape, b, dtype="float32", **kw) for b in (5, 6)}
    free = int(per[5] * (1 + sizing.ALLOCATOR_RESERVE_FRACTION) / (1 - sizing.FIT_SAFETY_FRACTION)) + 1
    assert free < per[6] * (1 + sizing.ALLOCATOR_RESERVE_FRACTION) / (1 - sizing.FIT_SAFETY_FRACTION)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (free - 1000, 10 * free))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 3000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 2000)
    batch, source = ev._eval_batch(tiny_lm, tiny_tokenizer, PROMPTS, settings, "cuda")
    assert batch == 5 and source["free_bytes"] == free and source["longest_prompt_tokens"] == longest
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (0, 10))
    assert ev._eval_batch(tiny_lm, tiny_tokenizer, PROMPTS, settings, "cuda")[0] == 1  # then OOM steps
