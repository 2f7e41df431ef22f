"""Packing (`train.packing`): several encoded rows per sequence, attention kept inside each row.

Rows are grouped by best-fit decreasing into sequences of at most `train.max_seq_length` tokens and
concatenated, with a `seq_lengths` column (TRL's packed-row format). The trainer then runs padding-free
(SFTConfig `packing=True, padding_free=True`): TRL's collator turns `seq_lengths` into position ids that
restart at 0 on every row, and no attention mask is passed. Attention stays inside each row because
the model is told where rows start:
- hf backend under sdpa/eager: each packed sequence is its own batch row (`keep_sequences_apart`), and
  with position ids, no attention mask and no KV cache (`without_kv_cache`) transformers' masking_utils
  finds the restarts and builds a block-diagonal causal mask per sequence;
- hf backend under flash-attention: TRL's layout, the micro-batch flattened into one sequence whose
  restarts become the kernel's variable-length bounds;
- Unsloth: TRL's flattened layout; its SFTTrainer patch reads `seq_lengths` into `packed_seq_lengths`
  for its own kernels.
tests/test_packing.py checks on CPU that a row's logits do not change with its neighbours' tokens.

The loss is unchanged per token: a row's first label is never a target unpacked (nothing precedes it),
so `pack_rows` sets it to -100 (TRL's collator does too, at every position id 0); the previous row's last
token therefore never learns to predict the next row. Assistant-only labels are copied as they are.

Also here: the batch statistics `ft size` and benchmarks/packing.py use (padding share, steps), and
the per-micro-batch token counter behind `tokens_per_step` / `padding_share` in metrics.jsonl.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Sequence
from typing import Any

IGNORE = -100


# -- grouping -------------------------------------------------------------------------------------------
def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Row indices grouped into bins of at most `capacity` tokens, best-fit decreasing.

    Longest rows first; each goes into the open bin with the least room that still holds it (a new bin
    when none does). Deterministic: ties keep index order. A row longer than `capacity` gets a bin of
    its own (encode has already truncated or dropped such rows).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, bin index), sorted
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(room, (n, -1))
        if at < len(room):
            free, b = room.pop(at)
        else:
            free, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if free - n > 0:
            bisect.insort(room, (free - n, b))
    return bins


def pack_rows(rows: Sequence[dict[str, list[int]]], max_seq_length: int) -> list[dict[str, list[int]]]:
    """Encoded rows (`input_ids`, `labels`) packed into rows with `seq_lengths`, ready for the trainer."""
    packed = []
    for group in pack([len(r["input_ids"]) for r in rows], max_seq_length):
        ids: list[int] = []
        labels: list[int] = []
        for i in group:
            row = rows[i]
            ids += row["input_ids"]
            labels += [IGNORE, *row["labels"][1:]]  # the row's first token is never a target
        packed.append(
            {"input_ids": ids, "labels": labels, "seq_lengths": [len(rows[i]["input_ids"]) for i in group]}
        )
    return packed


# -- what a batch costs -----------------------------------------------------------------------------------
def batch_stats(
    lengths: Sequence[int],
    *,
    micro_batch: int,
    effective_batch: int,
    max_seq_length: int,
    packing: bool,
    flattened: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Sequences and optimizer steps per epoch, and the share of padded slots, as training batches them.

    Each micro-batch is padded to its longest sequence (sequences in a seeded random order, as the
    trainer's sampler draws them): unpacked rows, or packed sequences in the layout the hf backend uses
    under sdpa/eager (`keep_sequences_apart`). `flattened`: packed and flattened into one sequence
    (flash-attention, Unsloth), which has no padding at all.
    """
    import random

    sizes = [sum(lengths[i] for i in b) for b in pack(lengths, max_seq_length)] if packing else list(lengths)
    real = sum(lengths)
    order = list(range(len(sizes)))
    random.Random(seed).shuffle(order)
    slots = 0
    for lo in range(0, len(order), micro_batch):
        chunk = [sizes[i] for i in order[lo : lo + micro_batch]]
        slots += sum(chunk) if packing and flattened else len(chunk) * max(chunk)
    return {
        "rows": len(lengths),
        "sequences": len(sizes),
        "steps_per_epoch": math.ceil(len(sizes) / effective_batch) if sizes else 0,
        "real_tokens": real,
        "token_slots": slots,
        "padding_share": round(1 - real / slots, 4) if slots else 0.0,
        "longest_sequence": max(sizes, default=0),
        "mean_fill": round(real / (len(sizes) * max_seq_length), 4) if packing and sizes else None,
    }


# -- tokens per step, measured ----------------------------------------------------------------------------
class TokenCounter:
    """Real and padded tokens of the micro-batches trained since the last `take()`.

    Real tokens: the attention mask's ones (padded batches), Unsloth's `packed_seq_lengths`, or, in the
    mask-free batches of packing, everything up to each row's last non-zero position id: padding sits
    at a row's end with position id 0, and a row's last real token never has position 0 (every encoded
    row has a prompt token and an answer token).
    """

    def __init__(self) -> None:
        self.real = 0
        self.slots = 0

    def add(self, inputs: dict[str, Any]) -> None:
        ids = inputs.get("input_ids")
        if ids is None:
            return
        slots = int(ids.numel())
        positions = inputs.get("position_ids")
        if inputs.get("attention_mask") is not None:
            real = int(inputs["attention_mask"].sum())
        elif inputs.get("packed_seq_lengths") is not None:
            real = int(inputs["packed_seq_lengths"].sum())
        elif positions is not None and positions.dim() == 2:
            nonzero = positions != 0
            last = positions.shape[1] - nonzero.flip(1).int().argmax(1)
            real = int((last * nonzero.any(1)).sum())
        else:
            real = slots
        self.real += real
        self.slots += slots

    def take(self) -> tuple[int, int]:
        out = (self.real, self.slots)
        self.real = self.slots = 0
        return out


def keep_sequences_apart(trainer) -> bool:
    """Batch packed sequences as `[micro_batch, length]` rows instead of one flattened sequence, unless
    the model runs flash-attention. Returns whether it did.

    TRL's padding-free collator flattens a micro-batch into one sequence: right for flash-attention
    (variable-length kernels, cost per row), but sdpa and eager then attend over the whole flattened
    length under a block mask, micro_batch^2 times the work of one packed sequence. Here the collator
    pads each packed sequence instead (right-padded, position ids 0, labels -100) and returns position
    ids without an attention mask, so transformers builds the block-diagonal mask per sequence; the pads
    start segments of their own and no real token attends to them. (Flash-attention in transformers
    reads restarts only from a single flattened row, so it keeps TRL's layout.)
    """
    from trl.trainer.sft_trainer import FLASH_ATTENTION_VARIANTS

    attn = str(getattr(trainer.model.config, "_attn_implementation", "") or "")
    collator = trainer.data_collator
    if attn.split("@")[0].split(":")[0] in FLASH_ATTENTION_VARIANTS or not hasattr(collator, "padding_free"):
        return False
    collator.padding_free = False
    collator.return_position_ids = True
    padded = collator.torch_call

    def torch_call(examples):
        batch = padded(examples)
        batch.pop("attention_mask", None)  # with a mask, transformers would ignore the position-id restarts
        return batch

    collator.torch_call = torch_call
    return True


def counting_trainer(base_cls):
    """`base_cls` counting its training micro-batches (not eval's) and adding, to every logged training
    loss, `tokens_per_step` (real tokens per optimizer step since the last log) and `padding_share`; the
    trackers and metrics.jsonl then get both."""

    class TokenCountingTrainer(base_cls):
        def training_step(self, model, inputs, *args, **kwargs):
            self._ft_tokens().add(inputs)
            return super().training_step(model, inputs, *args, **kwargs)

        def log(self, logs, *args, **kwargs):
            counter = self._ft_tokens()
            if "loss" in logs and counter.slots:
                real, slots = counter.take()
                steps = max(self.state.global_step - self._ft_logged_step, 1)
                logs["tokens_per_step"] = round(real / steps, 1)
                logs["padding_share"] = round(1 - real / slots, 4)
                self._ft_logged_step = self.state.global_step
            return super().log(logs, *args, **kwargs)

        def _ft_tokens(self) -> TokenCounter:
            if not hasattr(self, "_ft_counter"):
                # from the step training starts at (a resume's checkpoint step), counted in this process
                self._ft_counter, self._ft_logged_step = TokenCounter(), self.state.global_step
            return self._ft_counter

    return TokenCountingTrainer


def without_kv_cache(model) -> None:
    """Turn the model's KV cache off for packed training: transformers reads the row restarts from the
    position ids only when no cache is passed (masking_utils._preprocess_mask_arguments); with a cache,
    sdpa and eager would let every row attend to the rows before it. The hf backend already loads with
    the cache off; this keeps packing correct whatever the backend left."""
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = False


class _CheckedAttentionWarnings(logging.Filter):
    """TRL warns that only flash-attention is known to keep packed rows apart. ft keeps them apart under
    sdpa and eager too (keep_sequences_apart, without_kv_cache; tests/test_packing.py checks that a row's
    logits do not depend on its neighbours), so on ft's path the warning is noise. accelerate prefixes
    the message with the rank, hence a substring match."""

    NEEDLES = (
        "Padding-free training is enabled, but the attention implementation",
        "You are using packing, but the attention implementation",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(needle in str(record.msg) for needle in self.NEEDLES)


def quiet_checked_warnings() -> None:
    logger = logging.getLogger("trl.trainer.sft_trainer")
    if not any(isinstance(f, _CheckedAttentionWarnings) for f in logger.filters):
        logger.addFilter(_CheckedAttentionWarnings())


def sft_config_fields(settings) -> dict[str, Any]:
    """SFTConfig fields for `train.packing` (both backends build the config the hf way)."""
    if not settings.train.packing:
        return {}
    # The rows arrive packed (pack_rows); skip_prepare_dataset keeps TRL from packing them again.
    # packing=True also tells Unsloth's SFTTrainer patch to read `seq_lengths` for its kernels.
    return {"packing": True, "packing_strategy": "bfd", "padding_free": True, "eval_packing": False}
