"""Held-out loss without materialising batch x tokens x vocabulary logits.

A causal LM's forward applies the LM head to every position and eval then upcasts to fp32: ~25 GB
for a 7B Qwen at 8 x 2048 (152k vocabulary), enough to kill eval on a card that trained fine. Here the
decoder runs once per batch, only the positions that carry a label are kept, and the LM head plus the
cross-entropy run over those in chunks of at most LOGITS_CHUNK_BYTES of fp32 logits.
"""

from __future__ import annotations

from typing import Any

LOGITS_CHUNK_BYTES = 256 << 20  # fp32 logits of one chunk (~440 tokens at Qwen's 152k vocabulary)
# Architectures whose CausalLM forward is exactly lm_head(decoder(...).last_hidden_state): no logit
# scaling or soft-capping after the head (read in transformers 5.17's modeling files). Others take the
# per-row path, which still bounds the logits by one row.
PLAIN_HEAD = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma"})


def input_device(model):
    """Where the model expects its inputs: the input embeddings' device. Not the first parameter's, which
    may sit elsewhere (Unsloth can keep embed_tokens on the CPU when GPU memory is tight, device maps)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get else None
    weight = getattr(emb, "weight", None)
    if weight is not None:
        return weight.device
    return next(model.parameters()).device


def causal_lm(model):
    """The CausalLM inside a PeftModel (peft injects LoRA layers in place, so disable_adapter still applies)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def chunk_tokens(vocab: int, budget: int | None = None) -> int:
    return max(1, (budget or LOGITS_CHUNK_BYTES) // (4 * vocab))


def batch_tensors(rows: list[dict[str, Any]], pad: int, device):
    """input_ids, labels, attention mask of `rows`, right-padded to the longest."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[j, :n] = torch.tensor(r["input_ids"])
        labels[j, :n] = torch.tensor(r["labels"])
        mask[j, :n] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def _head_ce(head, hidden, targets, step: int) -> float:
    """Summed cross-entropy of head(hidden) against targets, `step` rows of logits at a time."""
    import torch

    total = 0.0
    w = head.weight
    for k in range(0, hidden.shape[0], step):
        logits = head(hidden[k : k + step].to(w.device)).float()
        total += torch.nn.functional.cross_entropy(
            logits, targets[k : k + step].to(logits.device), reduction="sum"
        ).item()
        del logits
    return total


def batch_loss(model, rows: list[dict[str, Any]], pad: int) -> tuple[float, int]:
    """(summed loss, number of target tokens) of one batch; each label predicted from the position before."""
    import torch

    lm = causal_lm(model)
    ids, labels, mask = batch_tensors(rows, pad, input_device(model))
    targets = labels[:, 1:]
    keep = targets != -100
    count = int(keep.sum().item())
    if count == 0:
        return 0.0, 0
    head = lm.get_output_embeddings()
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    with torch.inference_mode():
        if model_type in PLAIN_HEAD and head is not None:
            hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            selected = hidden[:, :-1][keep.to(hidden.device)]
            del hidden
            step = chunk_tokens(head.weight.shape[0])
            return _head_ce(head, selected, targets[keep], step), count
        total = 0.0  # the model's own forward, one row at a time: at most one row's logits
        for j in range(ids.shape[0]):
            logits = model(input_ids=ids[j : j + 1], attention_mask=mask[j : j + 1]).logits[0, :-1]
            row_keep = keep[j].to(logits.device)
            total += torch.nn.functional.cross_entropy(
                logits[row_keep].float(), targets[j][keep[j]].to(logits.device), reduction="sum"
            ).item()
            del logits
        return total, count
