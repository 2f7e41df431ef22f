"""Baseline vs tuned on the same held-out prompts, then the keep/discard rule.

One model is loaded (base + adapter); the baseline is the same weights with the adapter disabled, so
the comparison isolates exactly what the adapter changed. Generation is greedy and batched.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ft.config import resolve_path
from ft.errors import FtError
from ft.eval.metrics import average, decide, score


@dataclass
class EvalOutcome:
    report: dict[str, Any]
    predictions: list[dict[str, Any]]


def load_schema_validator(schema_setting):
    """A jsonschema validator for eval.json_schema (inline mapping, file path or builtin:NAME)."""
    if schema_setting is None:
        return None, None
    import jsonschema

    if isinstance(schema_setting, str):
        path = resolve_path(schema_setting)
        try:
            schema = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise FtError(f"eval.json_schema: cannot read {schema_setting}: {exc}") from None
    else:
        schema = schema_setting
    try:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise FtError(f"eval.json_schema: not a valid JSON Schema: {exc.message}") from None
    return cls(schema), schema


def _generate(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, desc: str
) -> list[str]:
    import torch

    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    outputs: list[str] = []
    device = next(model.parameters()).device
    interval = 0.2 if sys.stderr.isatty() else 15.0
    for i in tqdm(
        range(0, len(prompts), batch_size), desc=desc, unit="batch", dynamic_ncols=True, mininterval=interval
    ):
        batch = prompts[i : i + batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        outputs += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    tokenizer.padding_side = "right"
    return outputs


def _eval_loss(model, tokenizer, rows: list[dict[str, Any]], batch_size: int) -> float | None:
    """Mean loss per assistant token over the held-out rows."""
    import torch

    if not rows:
        return None
    device = next(model.parameters()).device
    total, count = 0.0, 0
    pad = tokenizer.pad_token_id
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[j, :n] = torch.tensor(r["input_ids"])
            labels[j, :n] = torch.tensor(r["labels"])
            mask[j, :n] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            shift_labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += loss.item()
        count += int((shift_labels != -100).sum().item())
    return round(total / max(count, 1), 6)


def evaluate(settings, adapter_dir: Path, examples: list, *, device: str, backend: str) -> EvalOutcome:
    """Generate for base and tuned on `examples`, score both and decide."""
    from ft import backends
    from ft.data.encode import encode, prompt_and_reference

    if not examples:
        raise FtError("eval: no held-out rows to evaluate; add data.eval files or raise data.eval_fraction")
    e = settings.eval
    examples = examples[: e.max_examples] if e.max_examples else examples
    validator, _ = load_schema_validator(e.json_schema)
    loaded = backends.get(backend).load_for_eval(settings, adapter_dir, device)
    model, tok = loaded.model, loaded.tokenizer

    pairs = [prompt_and_reference(ex, tok) for ex in examples]
    prompts = [p for p, _ in pairs]
    refs = [r for _, r in pairs]
    loss_rows = encode(examples, tok, settings.train.max_seq_length, "truncate", assistant_only=True)

    with model.disable_adapter():
        base_out = _generate(model, tok, prompts, e.max_new_tokens, e.batch_size, "eval base")
        base_loss = _eval_loss(model, tok, loss_rows, e.batch_size)
    tuned_out = _generate(model, tok, prompts, e.max_new_tokens, e.batch_size, "eval tuned")
    tuned_loss = _eval_loss(model, tok, loss_rows, e.batch_size)

    label_field = settings.data.label_field
    predictions, base_scores, tuned_scores = [], [], []
    for ex, prompt, ref, b, t in zip(examples, prompts, refs, base_out, tuned_out, strict=True):
        bs = score(b, ref, validator=validator, label_field=label_field)
        ts = score(t, ref, validator=validator, label_field=label_field)
        base_scores.append(bs)
        tuned_scores.append(ts)
        predictions.append(
            {
                "id": ex.id,
                "prompt": prompt,
                "reference": ref,
                "base": b,
                "tuned": t,
                "base_scores": bs,
                "tuned_scores": ts,
            }
        )
    base_avg, tuned_avg = average(base_scores), average(tuned_scores)
    if base_loss is not None:
        base_avg["eval_loss"], tuned_avg["eval_loss"] = base_loss, tuned_loss
    decision = decide(base_avg, tuned_avg, e)
    report = {
        "format": "ft-eval/1",
        "examples": len(examples),
        "backend": backend,
        "device": device,
        "generation": {"greedy": True, "max_new_tokens": e.max_new_tokens, "batch_size": e.batch_size},
        "metrics": {"base": base_avg, "tuned": tuned_avg},
        "decision": decision.to_dict(),
        "rule": {
            "primary_metric": e.primary_metric,
            "min_improvement": e.min_improvement,
            "guard_metrics": list(e.guard_metrics),
            "max_regression": e.max_regression,
        },
    }
    return EvalOutcome(report, predictions)
