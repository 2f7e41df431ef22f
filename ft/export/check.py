"""Proof by loading back: each export answers the held-out prompts, scored as `ft eval` scores the adapter.

The prompts, references and the adapter's answers come from the bundle's eval/predictions.jsonl (the
exact rendered prompts `ft eval` generated from), so the adapter is not re-run. Each format is loaded in
the runtime a user would run it in: transformers for the merged model, llama.cpp (`llama_cpp.Llama`)
for each GGUF. Generation is greedy with the recipe's `eval.max_new_tokens`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ft.errors import FtError
from ft.eval.metrics import average, score
from ft.progress import bar

# Largest |merged - adapter| logit allowed per merged dtype (fp32: measured 2e-5 on the tiny model).
LOGIT_TOLERANCE = {"float32": 1e-3, "float16": 0.05, "bfloat16": 0.25}
LOGIT_PROMPTS = 3


@dataclass
class Reference:
    prompts: list[str]
    references: list[str]
    answers: list[str]  # the adapter's (eval "tuned") answers
    metrics: dict[str, float]
    # Per prompt, the reference's tool calls (None for a plain answer): an export is scored on calls too.
    calls: list[list[dict] | None] | None = None


def load_reference(bundle_dir: Path) -> Reference:
    path = bundle_dir / "eval" / "predictions.jsonl"
    if not path.is_file():
        raise FtError(f"{bundle_dir}: no eval/predictions.jsonl; the export check needs the held-out prompts")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise FtError(f"{path}: no predictions; nothing to check an export against")
    return Reference(
        prompts=[r["prompt"] for r in rows],
        references=[r["reference"] for r in rows],
        answers=[r["tuned"] for r in rows],
        metrics=average([r["tuned_scores"] for r in rows]),
        calls=[r.get("reference_calls") for r in rows],
    )


def format_class(fmt: str) -> str:
    """Tolerance class of a format: 16bit (merged, f16), 8bit (q8_0), 4bit (everything lower)."""
    if fmt in ("merged", "f16"):
        return "16bit"
    return "8bit" if fmt.startswith("q8") else "4bit"


def score_answers(settings, ref: Reference, answers: list[str]) -> dict[str, float]:
    from ft.eval.evaluate import load_schema_validator

    validator, _ = load_schema_validator(settings.eval.json_schema)
    calls = ref.calls or [None] * len(answers)
    rows = [
        score(a, r, validator=validator, label_field=settings.data.label_field, ref_calls=c)
        for a, r, c in zip(answers, ref.references, calls, strict=True)
    ]
    return average(rows)


def logits(model, tokenizer, prompts: list[str]):
    import torch

    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = tokenizer(p, return_tensors="pt", add_special_tokens=False).to(model.device)
            out.append(model(**ids).logits.float()[0].cpu())
    return out


def generate_hf(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy, left-padded, batched: the same generation call `ft eval` makes for the adapter."""
    import torch

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    out: list[str] = []
    with bar(len(prompts), "check merged", "prompt") as progress:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(
                prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            )
            enc = enc.to(model.device)
            with torch.inference_mode():
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            new = gen[:, enc["input_ids"].shape[1] :]
            out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
            progress.update(len(new))
    tokenizer.padding_side = "right"
    return out


def run_merged(settings, merged_dir: Path, ref: Reference) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    # On a GPU when there is one: a 7B model generating on the CPU in transformers takes most of an hour.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype="auto").to(device)
    model.eval()
    tok = AutoTokenizer.from_pretrained(merged_dir)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    answers = generate_hf(model, tok, ref.prompts, settings.eval.max_new_tokens, settings.eval.batch_size)
    gen_s = time.perf_counter() - t0
    n_tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)
    merged_logits = logits(model, tok, ref.prompts[:LOGIT_PROMPTS])
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"answers": answers, "load_s": load_s, "gen_s": gen_s, "tokens": n_tokens, "logits": merged_logits}


def run_gguf(settings, path: Path, ref: Reference, hf_tokenizer) -> dict[str, Any]:
    from llama_cpp import Llama

    longest = max(len(hf_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in ref.prompts)
    t0 = time.perf_counter()
    llm = Llama(
        model_path=str(path),
        n_ctx=max(512, longest + settings.eval.max_new_tokens + 8),
        n_threads=os.cpu_count() or 1,
        seed=0,
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    answers, same_tokens, n_tokens = [], 0, 0
    t0 = time.perf_counter()
    with bar(len(ref.prompts), f"check {path.name}", "prompt") as progress:
        for prompt in ref.prompts:
            ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
            same_tokens += ids == hf_tokenizer(prompt, add_special_tokens=False)["input_ids"]
            out = llm.create_completion(
                prompt=ids,
                max_tokens=settings.eval.max_new_tokens,
                temperature=0.0,
                top_k=1,
                repeat_penalty=1.0,
            )
            answers.append(out["choices"][0]["text"].strip())
            n_tokens += out["usage"]["completion_tokens"]
            progress.update(1)
    gen_s = time.perf_counter() - t0
    llm.close()
    return {
        "answers": answers,
        "load_s": load_s,
        "gen_s": gen_s,
        "tokens": n_tokens,
        "prompt_tokens_identical": same_tokens / len(ref.prompts),
    }


def compare(settings, fmt: str, ref: Reference, run: dict[str, Any], size: int) -> dict[str, Any]:
    """One format's row of the report, with the metrics that dropped past the recipe's tolerance."""
    metrics = score_answers(settings, ref, run["answers"])
    cls = format_class(fmt)
    tolerance = settings.export.max_metric_drop[cls]
    drops = {k: round(ref.metrics[k] - metrics.get(k, 0.0), 6) for k in ref.metrics}
    breaches = [k for k, d in drops.items() if d > tolerance + 1e-9]
    identical = sum(a == b for a, b in zip(run["answers"], ref.answers, strict=True)) / len(ref.answers)
    row = {
        "format": fmt,
        "class": cls,
        "max_metric_drop": tolerance,
        "metrics": metrics,
        "adapter_metrics": ref.metrics,
        "drop": drops,
        "breaches": breaches,
        "identical_answers": round(identical, 6),
        "bytes": size,
        "load_s": round(run["load_s"], 3),
        "tokens_per_s": round(run["tokens"] / run["gen_s"], 1) if run["gen_s"] > 0 else None,
        "examples": len(ref.prompts),
    }
    for key in ("prompt_tokens_identical", "max_logit_diff", "logit_tolerance", "tensor_types"):
        if key in run:
            row[key] = run[key]
    return row


def render_md(report: dict[str, Any]) -> str:
    rows = report["formats"]
    metrics = list(rows[0]["adapter_metrics"]) if rows else []
    lines = [
        f"# Export check: {report['bundle']}",
        "",
        f"Each format answered the {rows[0]['examples'] if rows else 0} held-out prompts greedily in its own "
        "runtime (transformers for merged, llama.cpp for GGUF) and was scored as `ft eval` scores the adapter. "
        "A metric may drop by at most the recipe's `export.max_metric_drop` for the format's class.",
        "",
        "| format | "
        + " | ".join(f"{m} (adapter)" for m in metrics)
        + " | identical answers | size | load s | tokens/s | verdict |",
        "|---|" + "---|" * (len(metrics) + 5),
    ]
    for r in rows:
        cells = [f"{r['metrics'].get(m, 0):.3f} ({r['adapter_metrics'][m]:.3f})" for m in metrics]
        verdict = "ok" if not r["breaches"] else "DROPPED: " + ", ".join(r["breaches"])
        lines.append(
            f"| {r['format']} | "
            + " | ".join(cells)
            + f" | {r['identical_answers']:.0%} | {r['bytes'] / 2**20:.1f} MiB | {r['load_s']:.2f}"
            + f" | {r['tokens_per_s']} | {verdict} |"
        )
    lines.append("")
    for r in rows:
        extra = []
        if "max_logit_diff" in r:
            extra.append(
                f"max |logit diff| vs adapter {r['max_logit_diff']:.2e} (tolerance {r['logit_tolerance']})"
            )
        if "prompt_tokens_identical" in r:
            extra.append(f"prompt tokens identical to transformers' on {r['prompt_tokens_identical']:.0%}")
        if "tensor_types" in r:
            extra.append("tensor types " + ", ".join(f"{k}×{v}" for k, v in r["tensor_types"].items()))
        if extra:
            lines.append(f"- {r['format']}: " + "; ".join(extra))
    lines += ["", f"llama.cpp: {json.dumps(report.get('llama_cpp', {}), sort_keys=True)}", ""]
    return "\n".join(lines)
