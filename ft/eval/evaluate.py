"""Baseline vs tuned on the same held-out prompts, then the keep/discard rule.

One model is loaded (base + adapter); the baseline is the same weights with the adapter disabled, so
the comparison isolates exactly what the adapter changed. Generation is greedy and batched.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ft.config import resolve_path
from ft.errors import FtError
from ft.eval import benchmarks
from ft.eval.loss import batch_loss, causal_lm, input_device
from ft.eval.metrics import average, decide, score
from ft.sizing import autobatch


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


def _in_batches(
    items: list,
    batch_size: int,
    run: Callable[[list], list],
    what: str,
    steps: list[dict[str, Any]],
    bar=None,
) -> tuple[list, int]:
    """run(chunk) over consecutive chunks of `items`; on a CUDA out-of-memory the chunk is retried at half
    the batch (which then stays for the rest). Returns (all results in order, the batch size it ended at).
    Each step down is appended to `steps` for the report."""
    out: list = []
    i, size = 0, max(1, batch_size)
    while i < len(items):
        chunk = items[i : i + size]
        try:
            res = run(chunk)
        except Exception as exc:
            if not autobatch.is_oom(exc):
                raise
            if size == 1:
                raise FtError(
                    f"eval {what}: out of memory even one row at a time",
                    hint="lower eval.max_new_tokens or train.max_seq_length, or evaluate on a larger GPU",
                ) from exc
            steps.append({"phase": what, "batch_size": size, "error": autobatch.first_line(exc)})
        else:
            out += res
            i += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
            continue
        # Outside the except block, so the failed attempt's tensors (held by the traceback) can be freed.
        autobatch.free_memory()
        size = max(1, size // 2)
        print(f"eval {what}: out of memory; retrying with batch {size}", file=sys.stderr)
    return out, size


def _generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    desc: str,
    steps: list[dict[str, Any]] | None = None,
) -> tuple[list[str], int]:
    """Greedy answers for `prompts`, and the batch size generation ended at (lower after an OOM)."""
    import torch

    device = input_device(model)

    def run(batch: list[str]) -> list[str]:
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
        return [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    interval = 0.2 if sys.stderr.isatty() else 15.0
    try:
        with tqdm(
            total=len(prompts), desc=desc, unit="prompt", dynamic_ncols=True, mininterval=interval
        ) as bar:
            return _in_batches(prompts, batch_size, run, desc, steps if steps is not None else [], bar)
    finally:
        tokenizer.padding_side = "right"


def _eval_loss(
    model, tokenizer, rows: list[dict[str, Any]], batch_size: int, steps: list[dict[str, Any]] | None = None
) -> float | None:
    """Mean loss per assistant token over the held-out rows (logits computed in bounded chunks)."""
    if not rows:
        return None
    sums, _ = _in_batches(
        rows,
        batch_size,
        lambda batch: [batch_loss(model, batch, tokenizer.pad_token_id)],
        "loss",
        steps if steps is not None else [],
    )
    total, count = sum(t for t, _ in sums), sum(n for _, n in sums)
    return round(total / max(count, 1), 6)


def _eval_batch(model, tokenizer, prompts: list[str], settings, device: str) -> tuple[int, dict[str, Any]]:
    """eval.batch_size, lowered on a GPU to what the sizing model predicts fits in the memory left free
    after loading (prompt + eval.max_new_tokens of KV cache, the last position's logits, one layer)."""
    e = settings.eval
    if device != "cuda":
        return e.batch_size, {"source": "eval.batch_size (not on a GPU)"}
    import torch

    from ft import sizing

    lm = causal_lm(model)
    shape = sizing.load_shape(lm.config)
    longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    dtype = str(next(p.dtype for p in lm.parameters() if p.is_floating_point())).removeprefix("torch.")
    batch = sizing.eval_batch_that_fits(
        shape,
        free,
        e.batch_size,
        prompt_tokens=longest,
        new_tokens=e.max_new_tokens,
        loss_tokens=settings.train.max_seq_length,
        dtype=dtype,
    )
    return batch, {
        "source": "sizing model against the free GPU memory after loading",
        "free_bytes": int(free),
        "longest_prompt_tokens": longest,
    }


def evaluate(settings, adapter_dir: Path, examples: list, *, device: str, backend: str) -> EvalOutcome:
    """Generate for base and tuned on `examples`, score both and decide."""
    from ft import backends
    from ft.data.encode import encode, prompt_and_reference
    from ft.data.tools import reference_calls

    if not examples:
        raise FtError("eval: no held-out rows to evaluate; add data.eval files or raise data.eval_fraction")
    e = settings.eval
    examples = examples[: e.max_examples] if e.max_examples else examples
    validator, _ = load_schema_validator(e.json_schema)
    # Checked before the model loads: a missing task file or harness fails in seconds, not after eval.
    bench_tasks = benchmarks.resolve(e.benchmarks) if e.benchmarks else []
    loaded = backends.get(backend).load_for_eval(settings, adapter_dir, device)
    model, tok = loaded.model, loaded.tokenizer

    pairs = [prompt_and_reference(ex, tok) for ex in examples]
    prompts = [p for p, _ in pairs]
    refs = [r for _, r in pairs]
    loss_rows = encode(examples, tok, settings.train.max_seq_length, "truncate", assistant_only=True)

    batch, batch_source = _eval_batch(model, tok, prompts, settings, device)
    steps: list[dict[str, Any]] = []
    with model.disable_adapter():
        base_out, batch = _generate(model, tok, prompts, e.max_new_tokens, batch, "eval base", steps)
        base_loss = _eval_loss(model, tok, loss_rows, batch, steps)
    tuned_out, batch = _generate(model, tok, prompts, e.max_new_tokens, batch, "eval tuned", steps)
    tuned_loss = _eval_loss(model, tok, loss_rows, batch, steps)
    bench = (
        benchmarks.run(model, tok, bench_tasks, limit=e.benchmark_limit, batch_size=batch)
        if bench_tasks
        else None
    )

    label_field = settings.data.label_field
    predictions, base_scores, tuned_scores = [], [], []
    for ex, prompt, ref, b, t in zip(examples, prompts, refs, base_out, tuned_out, strict=True):
        calls = reference_calls(ex.messages[-1])  # a tool-call answer is also scored as calls
        bs = score(b, ref, validator=validator, label_field=label_field, ref_calls=calls)
        ts = score(t, ref, validator=validator, label_field=label_field, ref_calls=calls)
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
                **({"reference_calls": calls} if calls else {}),
            }
        )
    base_avg, tuned_avg = average(base_scores), average(tuned_scores)
    if base_loss is not None:
        base_avg["eval_loss"], tuned_avg["eval_loss"] = base_loss, tuned_loss
    decision = decide(base_avg, tuned_avg, e, bench["tasks"] if bench else None)
    report = {
        "format": "ft-eval/1",
        "examples": len(examples),
        "backend": backend,
        "device": device,
        "generation": {
            "greedy": True,
            "max_new_tokens": e.max_new_tokens,
            "batch_size": batch,
            "batch_size_setting": e.batch_size,
            "batch_size_source": batch_source,
            "out_of_memory_steps": steps,
        },
        "metrics": {"base": base_avg, "tuned": tuned_avg},
        "decision": decision.to_dict(),
        "rule": {
            "primary_metric": e.primary_metric,
            "min_improvement": e.min_improvement,
            "guard_metrics": list(e.guard_metrics),
            "max_regression": e.max_regression,
        },
    }
    if bench:
        report["rule"]["max_benchmark_drop"] = e.max_benchmark_drop
        report["benchmarks"] = decision.benchmarks
        report["benchmark_harness"] = bench["harness"]
    return EvalOutcome(report, predictions)
