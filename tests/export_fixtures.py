"""A sealed-able tiny-model run made in seconds, for the export and push tests (imported by them; tests/ is
on sys.path under pytest's default import mode)."""

from __future__ import annotations

import json
from pathlib import Path


def fake_run(root: Path) -> Path:
    """A finished, evaluated run of the tiny model without training it (seconds, not minutes): a LoRA with
    random non-zero B, its greedy answers on held-out ticket prompts as the eval's "tuned" predictions."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ft.config import load_settings
    from ft.eval.evaluate import load_schema_validator
    from ft.eval.metrics import average, score
    from ft.export.check import generate_hf
    from ft.fsutil import write_json, write_text
    from ft.manifest import capture
    from ft.testing import ensure_tiny_model, ticket_rows

    settings = load_settings("tiny", {"eval": {"max_new_tokens": 12}})
    run = root / "runs" / "exp"
    tiny = ensure_tiny_model()
    tok = AutoTokenizer.from_pretrained(tiny)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.eval()
    model.save_pretrained(run / "adapter")
    rows = ticket_rows(10, seed=5)
    prompts = [
        tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True) for r in rows
    ]
    refs = [r["messages"][-1]["content"] for r in rows]
    answers = generate_hf(model, tok, prompts, settings.eval.max_new_tokens, settings.eval.batch_size)
    validator, _ = load_schema_validator(settings.eval.json_schema)
    scores = [
        score(a, r, validator=validator, label_field="category") for a, r in zip(answers, refs, strict=True)
    ]
    preds = [
        {"id": i, "prompt": p, "reference": r, "base": a, "tuned": a, "base_scores": s, "tuned_scores": s}
        for i, (p, r, a, s) in enumerate(zip(prompts, refs, answers, scores, strict=True))
    ]
    write_text(run / "eval" / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in preds))
    metrics = average(scores)
    write_json(
        run / "eval" / "report.json",
        {
            "format": "ft-eval/1",
            "metrics": {"base": metrics, "tuned": metrics},
            "decision": {"verdict": "KEEP"},
        },
    )
    write_text(run / "recipe.resolved.yaml", settings.to_yaml())
    write_json(run / "env.json", capture(with_torch=False, full=False))
    write_json(run / "data.json", {"files": []})
    write_json(run / "run.json", {"name": "exp", "status": "complete", "completed": "2026-01-01T00:00:00Z"})
    return run
