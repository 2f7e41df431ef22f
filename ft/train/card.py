"""The adapter's model card (README.md) and the base model it names.

PEFT writes an empty template card and records the base model as the directory it was loaded from,
which for a Hub model is a local cache path that means nothing on another machine. ft replaces both
with the recipe's model id (and revision), and writes a card that says what the adapter is, how it was
trained, where its evaluation is, and how to load it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ft.fsutil import write_json, write_text

# owner/name as the Hub spells repositories; anything else (builtin:, a local folder) is not a Hub id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()


def set_base_model(adapter_dir: Path, settings) -> None:
    """adapter_config.json names the recipe's model (and revision), not the path it was loaded from."""
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = settings.model.name_or_path
    config["revision"] = settings.model.revision
    write_json(path, config)


def render(settings, facts: dict[str, Any]) -> str:
    """README.md for the adapter directory. `facts`: run, steps, tokens_seen, backend, dtype,
    quantization, data_sha256 and data_files ([(name, rows)])."""
    from ft import __version__
    from ft.secrets import redact

    m, lora, t = settings.model, settings.lora, settings.train
    model_id = m.name_or_path
    tags = ["ft", "lora", "sft", "trl", "peft"] + (["qlora"] if facts.get("quantization") == "nf4" else [])
    front = ["---"]
    if is_hub_id(model_id):
        front.append(f"base_model: {model_id}")
    front += ["library_name: peft", "pipeline_tag: text-generation", "tags:"]
    front += [f"- {tag}" for tag in tags] + ["---", ""]

    revision = (
        f" at revision `{m.revision}`" if m.revision else " (revision not pinned; model.revision pins one)"
    )
    files = ", ".join(f"`{Path(name).name}` ({rows} rows)" for name, rows in facts.get("data_files", []))
    steps = facts.get("steps")
    rows = [
        ("base model", f"`{model_id}`{revision}"),
        ("recipe", f"`{settings.name}` (sha256 `{settings.sha256}`)"),
        ("data", f"{files or 'see ../data.json'}; data sha256 `{facts.get('data_sha256', '')}`"),
        ("steps", f"{steps} optimizer steps, {facts.get('tokens_seen', 0):,} tokens"),
        (
            "batch",
            f"effective {t.effective_batch} (micro-batch {facts.get('micro_batch')} x accumulation "
            f"{facts.get('grad_accum')}), max_seq_length {t.max_seq_length}",
        ),
        (
            "optimizer",
            f"{t.optimizer}, learning rate {t.learning_rate}, {t.lr_scheduler} schedule, seed {t.seed}",
        ),
        (
            "LoRA",
            f"r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout}, on {', '.join(lora.target_modules)}",
        ),
        (
            "precision",
            f"base loaded {facts.get('quantization')} ({facts.get('dtype')}), backend {facts.get('backend')}",
        ),
    ]
    load = [
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{model_id}"'
        + (f', revision="{m.revision}"' if m.revision else "")
        + ")",
        'model = PeftModel.from_pretrained(base, "adapter")  # this directory',
        'tokenizer = AutoTokenizer.from_pretrained("adapter")  # with the chat template used in training',
        "```",
    ]
    if model_id.startswith("builtin:"):
        load.append(
            f"\n`{model_id}` is ft's offline test model, rebuilt on any machine by "
            "`ft.testing.ensure_tiny_model()`; load the base from the directory it returns."
        )
    body = [
        f"# {facts.get('run', settings.name)}: a LoRA adapter for `{model_id}`",
        "",
        redact(settings.description) or "A LoRA adapter trained with ft.",
        "",
        f"Trained with ft {__version__} (supervised fine-tuning on chat rows, loss on the assistant's tokens"
        + (")." if t.assistant_only_loss else " and the prompt's)."),
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in rows],
        "",
        "The full recipe is `../recipe.resolved.yaml`, the environment `../env.json`, the data manifest "
        "`../data.json` and the loss curve `../metrics.jsonl` (in the run directory or the bundle).",
        "",
        "## Evaluation",
        "",
        "Base and tuned model on the held-out rows, with the KEEP/DISCARD decision: `../decision.md` and "
        "`../eval/report.md`, written by `ft eval` after training.",
        "",
        "## Use",
        "",
        *load,
        "",
    ]
    return "\n".join(front + body)


def write_card(adapter_dir: Path, settings, facts: dict[str, Any]) -> None:
    write_text(Path(adapter_dir) / "README.md", render(settings, facts))
