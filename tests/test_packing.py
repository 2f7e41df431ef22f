"""train.packing: rows packed into max_seq_length sequences, padding-free, on the tiny model on CPU.

Tolerances: the model runs in float32. Packed and unpacked compute the same dot products, but over
other tensor shapes (one flattened sequence vs. a padded batch), so the kernels sum in another order:
float32 rounding (~1e-7 relative per operation, 2 layers) moves logits by ~1e-6, which is why the
per-token losses are compared at 1e-4 absolute and the mean at 1e-5 relative. A crossed row boundary
would move them by orders of magnitude more (the sanity check below measures how much).
"""

from __future__ import annotations

import json
import math
import random
import sys
import types

import pytest

from ft.data import Example
from ft.data.encode import IGNORE, encode
from ft.sizing.throughput import PACKED_FILL
from ft.testing import ticket_rows
from ft.train import packing


def encoded(tokenizer, n: int = 12, seed: int = 0, max_len: int = 256) -> list[dict]:
    rows = ticket_rows(n, seed)
    rng = random.Random(seed)
    for row in rows:  # lengths that differ, so unpacked batches have padding
        row["messages"][1]["content"] += " please" * rng.randrange(0, 40)
    examples = [Example(r["messages"], "t.jsonl", i + 1, "messages") for i, r in enumerate(rows)]
    return encode(examples, tokenizer, max_len)


# -- grouping ---------------------------------------------------------------------------------------------
def test_best_fit_bins_cover_every_row_once_within_capacity_and_match_trls_count():
    import pyarrow as pa
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    rng = random.Random(1)
    lengths = [rng.randrange(5, 120) for _ in range(500)]
    bins = packing.pack(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    trl_packed = pack_dataset(
        Dataset(pa.table({"input_ids": [[1] * n for n in lengths]})), 128, strategy="bfd"
    )
    assert len(bins) == len(trl_packed)  # the same best-fit-decreasing grouping as TRL's packer
    assert len(bins) <= -(-sum(lengths) // 128) * 1.02


def test_packing_keeps_assistant_only_labels(tiny_tokenizer):
    rows = encoded(tiny_tokenizer)
    packed = packing.pack_rows(rows, 256)
    assert len(packed) < len(rows)
    seen = 0
    for p in packed:
        assert len(p["input_ids"]) == len(p["labels"]) == sum(p["seq_lengths"]) <= 256
        at = 0
        for n in p["seq_lengths"]:
            ids, labels = p["input_ids"][at : at + n], p["labels"][at : at + n]
            original = next(r for r in rows if r["input_ids"] == ids)
            assert original["labels"][0] == IGNORE  # chat rows start with a prompt token: nothing is lost
            assert labels == original["labels"]  # the assistant span, exactly
            assert labels[0] == IGNORE  # the boundary: the previous row's last token predicts nothing here
            at, seen = at + n, seen + 1
    assert seen == len(rows)


# -- the model's view -----------------------------------------------------------------------------------
def _model(tiny_model_dir, attn: str):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir), dtype=torch.float32, attn_implementation=attn
    )
    packing.without_kv_cache(model)  # as in training; the next test shows why it matters
    return model.eval()


def _per_token_losses(logits, labels):
    """{(row tokens as a tuple, position): loss} over the label tokens of one flat or padded row."""
    import torch.nn.functional as F

    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE, reduction="none")


def collator(tokenizer, layout: str, attn: str = "sdpa"):
    """TRL's padding-free collator, flattened (flash-attention, Unsloth) or per sequence (ft's hf backend
    under sdpa/eager: packing.keep_sequences_apart)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    if layout == "sequences":
        config = types.SimpleNamespace(_attn_implementation=attn)
        trainer = types.SimpleNamespace(model=types.SimpleNamespace(config=config), data_collator=collate)
        assert packing.keep_sequences_apart(trainer)
    return collate


def test_flash_attention_keeps_trls_flattened_batches(tiny_tokenizer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    config = types.SimpleNamespace(_attn_implementation="flash_attention_2")
    trainer = types.SimpleNamespace(model=types.SimpleNamespace(config=config), data_collator=collate)
    assert not packing.keep_sequences_apart(trainer) and collate.padding_free


@pytest.mark.parametrize("layout", ["flattened", "sequences"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss_per_token(tiny_model_dir, tiny_tokenizer, attn, layout):
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = _model(tiny_model_dir, attn)
    rows = encoded(tiny_tokenizer)
    padded = DataCollatorForLanguageModeling(pad_token_id=tiny_tokenizer.pad_token_id)(rows)
    packed_rows = packing.pack_rows(rows, 256)
    batch = collator(tiny_tokenizer, layout, attn)(packed_rows)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    assert batch["input_ids"].shape[0] == (1 if layout == "flattened" else len(packed_rows))
    counter = packing.TokenCounter()
    counter.add(batch)
    assert counter.real == sum(len(r["input_ids"]) for r in rows)  # padding told apart without a mask

    with torch.no_grad():
        un = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"])
        pk = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
        un_loss = model(**padded).loss
        pk_loss = model(**batch).loss

    per_row_unpacked = {}
    for k, row in enumerate(rows):
        n = len(row["input_ids"])
        per_row_unpacked[tuple(row["input_ids"])] = _per_token_losses(
            un.logits[k, :n], padded["labels"][k, :n]
        )
    at, compared = 0, 0
    for k, p in enumerate(packed_rows):
        line = 0 if layout == "flattened" else k
        at = at if layout == "flattened" else 0
        for n in p["seq_lengths"]:
            ids = tuple(batch["input_ids"][line, at : at + n].tolist())
            got = _per_token_losses(pk.logits[line, at : at + n], batch["labels"][line, at : at + n])
            torch.testing.assert_close(got, per_row_unpacked[ids], atol=1e-4, rtol=0)
            at, compared = at + n, compared + 1
    assert compared == len(rows)
    assert (batch["labels"] != IGNORE).sum() == (padded["labels"] != IGNORE).sum()  # the same targets
    torch.testing.assert_close(pk_loss, un_loss, atol=0, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_attention_crosses_a_row_boundary(tiny_model_dir, tiny_tokenizer, attn):
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = _model(tiny_model_dir, attn)
    a, b = encoded(tiny_tokenizer, n=2)
    other_a = dict(a, input_ids=[(t + 7) % 500 for t in a["input_ids"]])
    collate = DataCollatorForLanguageModeling(pad_token_id=tiny_tokenizer.pad_token_id, padding_free=True)

    def b_logits(first, reset=True):  # row B packed after row A, so B could attend to A
        n = len(first["input_ids"])
        row = {"input_ids": first["input_ids"] + b["input_ids"], "seq_lengths": [n, len(b["input_ids"])]}
        batch = collate([row])
        pos = batch["position_ids"] if reset else torch.arange(batch["input_ids"].shape[1])[None]
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], position_ids=pos).logits[0, n:]

    torch.testing.assert_close(b_logits(a), b_logits(other_a), atol=1e-5, rtol=0)
    # the check can see a crossing: without the position-id restart, row A's tokens reach row B
    assert (b_logits(a, reset=False) - b_logits(other_a, reset=False)).abs().max() > 1e-3
    # and with a KV cache passed, transformers ignores the restarts: why packing turns the cache off
    model.config.use_cache = True
    assert (b_logits(a) - b_logits(other_a)).abs().max() > 1e-3


# -- training -------------------------------------------------------------------------------------------
def _train(tiny_settings, tiny_tokenizer, tmp_path, name: str, *, pack: bool, rows=None, **extra):
    from ft import train as training

    s = tiny_settings(
        **{
            "train.packing": pack,
            "train.max_seq_length": 256,
            "train.max_steps": 1,
            "train.micro_batch": 8,
            "train.effective_batch": 8,
            "lora.dropout": 0.0,
            **extra,
        }
    )
    run_dir = tmp_path / name
    run_dir.mkdir()
    result = training.train(
        s,
        run_dir,
        rows if rows is not None else encoded(tiny_tokenizer, n=8),
        [],
        data_sha256="x",
        device="cpu",
        backend="hf",
        backend_reason="test",
        micro_batch=s.train.micro_batch,
    )
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return result, [m for m in metrics if m.get("kind") == "train"]


def test_first_training_step_has_the_same_loss_packed_and_metrics_record_tokens(
    tiny_settings, tiny_tokenizer, tmp_path
):
    rows = encoded(tiny_tokenizer, n=8)
    plain, m_plain = _train(tiny_settings, tiny_tokenizer, tmp_path, "plain", pack=False, rows=rows)
    packed, m_packed = _train(tiny_settings, tiny_tokenizer, tmp_path, "packed", pack=True, rows=rows)
    first_plain, first_packed = m_plain[0], m_packed[0]
    # step 1 trains on all 8 rows either way (one micro-batch): the same loss and gradient before any update
    assert first_packed["loss"] == pytest.approx(first_plain["loss"], rel=1e-5)
    assert first_packed["grad_norm"] == pytest.approx(first_plain["grad_norm"], rel=1e-4)
    real = sum(len(r["input_ids"]) for r in rows)
    assert first_plain["tokens_per_step"] == first_packed["tokens_per_step"] == real
    longest = max(len(r["input_ids"]) for r in rows)
    assert first_plain["padding_share"] == pytest.approx(1 - real / (8 * longest), abs=1e-4)
    # the hf backend pads each packed sequence to the micro-batch's longest (keep_sequences_apart)
    sizes = [len(p["input_ids"]) for p in packing.pack_rows(rows, 256)]
    assert first_packed["padding_share"] == pytest.approx(1 - real / (len(sizes) * max(sizes)), abs=1e-4)
    assert 0 < first_packed["padding_share"] < first_plain["padding_share"]


def test_packing_lowers_the_steps_per_epoch(tiny_settings, tiny_tokenizer, tmp_path):
    rows = encoded(tiny_tokenizer, n=16, seed=3)
    kw = {"train.max_steps": None, "train.epochs": 1, "train.effective_batch": 4, "train.micro_batch": 4}
    plain, _ = _train(tiny_settings, tiny_tokenizer, tmp_path, "plain", pack=False, rows=rows, **kw)
    packed, metrics = _train(tiny_settings, tiny_tokenizer, tmp_path, "packed", pack=True, rows=rows, **kw)
    sequences = len(packing.pack_rows(rows, 256))
    assert plain.steps == 4 and packed.steps == -(-sequences // 4) < 4
    assert sum(m["tokens_per_step"] for m in metrics) == sum(len(r["input_ids"]) for r in rows)


# -- Unsloth: the same packed rows and SFTConfig reach its trainer -----------------------------------------
@pytest.fixture
def fake_unsloth(monkeypatch):
    """`unsloth` whose FastLanguageModel (unsloth 2026.10.5's call signature, keyword arguments) loads with
    transformers and real peft, as Unsloth does underneath."""

    class FastLanguageModel:
        @staticmethod
        def from_pretrained(**kw):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(kw["model_name"], dtype=kw["dtype"])
            return model, AutoTokenizer.from_pretrained(kw["model_name"])

        @staticmethod
        def get_peft_model(model, **kw):
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                r=kw["r"],
                lora_alpha=kw["lora_alpha"],
                lora_dropout=kw["lora_dropout"],
                target_modules=kw["target_modules"],
                bias=kw["bias"],
                task_type="CAUSAL_LM",
            )
            return get_peft_model(model, config)

    fake = types.ModuleType("unsloth")
    fake.FastLanguageModel = FastLanguageModel
    monkeypatch.setitem(sys.modules, "unsloth", fake)


def test_unsloth_gets_packed_rows_and_the_packing_config(
    tiny_settings, tiny_tokenizer, tmp_path, monkeypatch, fake_unsloth
):
    from transformers import TrainerCallback

    from ft import train as training

    seen: dict = {}

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
            # Unsloth's SFTTrainer patch packs when args.packing and no custom collator, and reads
            # `seq_lengths` from each row into `packed_seq_lengths` (unsloth/utils/packing.py)
            seen.update(
                packing=args.packing,
                padding_free=args.padding_free,
                columns=train_dataloader.dataset.column_names,
            )

    original = training._callbacks
    monkeypatch.setattr(training, "_callbacks", lambda run_dir, hint: original(run_dir, hint) + [Record()])
    rows = encoded(tiny_tokenizer, n=8)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    s = tiny_settings(
        **{"train.backend": "unsloth", "train.device": "auto", "train.packing": True, "train.max_steps": 1}
    )
    result = training.train(
        s,
        run_dir,
        rows,
        [],
        data_sha256="x",
        device="cuda",
        backend="unsloth",
        backend_reason="t",
        micro_batch=8,
    )
    assert result.backend == "unsloth" and result.steps == 1
    assert seen["packing"] is True and seen["padding_free"] is True
    assert "seq_lengths" in seen["columns"]


# -- ft size --------------------------------------------------------------------------------------------
def test_ft_size_counts_packed_sequences_at_the_full_length_memory(tiny_settings):
    from ft import sizing
    from ft.data.report import token_stats

    rng = random.Random(0)
    lengths = [rng.randrange(40, 100) for _ in range(1000)]
    checked = {"train_rows": 1000, "mean_tokens": sum(lengths) / 1000, "tokens": token_stats(lengths)}

    def report(pack: bool, stats):
        s = tiny_settings(**{"train.packing": pack, "train.max_seq_length": 512, "train.epochs": 1})
        return sizing.size_report(s, gpu="24GiB", data_stats=stats)

    plain, packed = report(False, checked), report(True, checked)
    # memory: a packed sequence is max_seq_length long, the length the estimate already sizes every row at
    assert packed.estimate.peak_allocated_bytes == plain.estimate.peak_allocated_bytes
    assert plain.eta["steps"] == 1000 // 8
    bins = len(packing.pack(lengths, 512))
    # from the data check's histogram: rows at their bin's top, so a few more sequences than the real ones
    assert bins <= packed.eta["packing"]["sequences"] <= bins * 1.1
    assert packed.eta["steps"] == -(-packed.eta["packing"]["sequences"] // 8) < plain.eta["steps"] / 4
    assert packed.eta["tokens"] == pytest.approx(plain.eta["tokens"], rel=0.1)  # the same real tokens
    assert "packing:" in packed.render() and "packing:" not in plain.render()

    # only a mean (`--tokens`): total / max_seq_length at the fill best-fit packing reaches
    mean_only = report(True, {"train_rows": 1000, "mean_tokens": 70.0})
    assert mean_only.eta["packing"]["sequences"] == math.ceil(70_000 / (512 * PACKED_FILL))
    # no lengths at all: no fewer steps than unpacked can be promised
    blind_plain, blind = report(False, {"train_rows": 1000}), report(True, {"train_rows": 1000})
    assert blind.eta["steps"] == blind_plain.eta["steps"] and "unknown" in blind.eta["packing"]["source"]
