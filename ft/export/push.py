"""`ft push`: a sealed bundle's adapter (or its export's merged model / GGUF files) to the Hugging Face Hub.

The bundle is verified first, then uploaded with a model card generated from it: base model, recipe,
data hashes, the eval table, the environment, and the bundle's identity. The token comes from HF_TOKEN
in the environment and is only ever handed to huggingface_hub: never printed, never written to a file.
HF_ENDPOINT points the upload at another Hub (the tests use a local stand-in).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ft.errors import FtError

WHAT = {"adapter": "adapter", "merged": "export/merged", "gguf": "export/gguf"}


def _load(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    return json.loads(text) if path.suffix == ".json" else text


def model_card(bundle: Path, repo: str, what: str) -> str:
    """README.md for the Hub repository, built only from the bundle's own (verified) files."""
    from ft.fsutil import sha256_file

    recipe_text = _load(bundle / "recipe.resolved.yaml") or ""
    recipe = yaml.safe_load(recipe_text) or {}
    model = recipe.get("model") or {}
    report = _load(bundle / "eval" / "report.json") or {}
    data = _load(bundle / "data.json") or {}
    env = _load(bundle / "env.json") or {}
    base = model.get("name_or_path", "unknown")
    front = {
        "base_model": base,
        "library_name": "peft" if what == "adapter" else ("gguf" if what == "gguf" else "transformers"),
        "tags": ["ft", "lora"] + (["gguf"] if what == "gguf" else []),
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=True).strip(),
        "---",
        "",
        f"# {repo}",
        "",
        f"{recipe.get('description') or 'A LoRA fine-tune'} — {what} of the sealed ft bundle "
        f"`{bundle.name}` (identity `{sha256_file(bundle / 'MANIFEST.json')}`, the sha256 of its MANIFEST.json).",
        "",
        f"- Base model: `{base}`" + (f" at revision `{model['revision']}`" if model.get("revision") else ""),
        f"- Verdict of the evaluation: **{(report.get('decision') or {}).get('verdict', 'unknown')}**",
        "",
        "## Evaluation (held-out rows, greedy)",
        "",
    ]
    metrics = report.get("metrics") or {}
    base_m, tuned_m = metrics.get("base") or {}, metrics.get("tuned") or {}
    if tuned_m:
        lines += ["| metric | base | tuned |", "|---|---|---|"]
        lines += [f"| {k} | {base_m.get(k, '')} | {v} |" for k, v in tuned_m.items()]
    export_report = _load(bundle / "export" / "report.json")
    if isinstance(export_report, dict) and export_report.get("formats_checked"):
        lines += ["", "## Exports loaded back and scored", "", "| format | " + " | ".join(tuned_m) + " |"]
        lines.append("|---|" + "---|" * len(tuned_m))
        for row in export_report["formats_checked"]:
            lines.append(
                f"| {row['format']} | " + " | ".join(str(row["metrics"].get(k, "")) for k in tuned_m) + " |"
            )
    lines += ["", "## Data", ""]
    files = data.get("files") if isinstance(data, dict) else None
    for f in files or []:
        if isinstance(f, dict):
            lines.append(f"- `{Path(str(f.get('path', '?'))).name}` sha256 `{f.get('sha256', '?')}`")
    facts = {
        k: env.get(k) for k in ("python", "torch", "transformers", "peft", "cuda", "platform") if k in env
    }
    lines += ["", "## Environment", "", "```json", json.dumps(facts, indent=2, sort_keys=True), "```"]
    lines += ["", "## Recipe", "", "```yaml", recipe_text.strip(), "```", ""]
    return "\n".join(lines)


def push(
    bundle: Path, repo: str, *, what: str = "adapter", private: bool = False, revision: str | None = None
) -> str:
    """Upload and return the commit URL."""
    from ft.bundle import verify

    if what not in WHAT:
        raise FtError(f"push: --what must be one of {', '.join(WHAT)}")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise FtError(f"push: --repo {repo!r} is not of the form user/name")
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise FtError("push: HF_TOKEN is not set; export a Hub token with write access in the environment")
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise FtError(f"{bundle}: push needs a bundle directory (extract an archive with `ft verify` first)")
    verify(bundle)
    src = bundle / WHAT[what]
    if not src.is_dir() or not any(src.iterdir()):
        hint = " (run `ft export` and push the export bundle)" if what != "adapter" else ""
        raise FtError(f"{bundle}: has no {WHAT[what]}/ to push{hint}")
    from huggingface_hub import HfApi

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    with tempfile.TemporaryDirectory(prefix="ft-push-") as tmp:
        stage = Path(tmp) / "repo"
        shutil.copytree(src, stage)
        (stage / "README.md").write_text(model_card(bundle, repo, what), encoding="utf-8")
        for rel in ("recipe.resolved.yaml", "eval/report.json", "MANIFEST.json"):
            if (bundle / rel).is_file():
                (stage / "ft" / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(bundle / rel, stage / "ft" / rel)
        try:
            api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(
                folder_path=str(stage),
                repo_id=repo,
                repo_type="model",
                revision=revision,
                commit_message=f"ft push: {what} of {bundle.name}",
            )
        except Exception as exc:  # huggingface_hub raises many types; the user needs one line
            msg = str(exc).replace(token, "***").splitlines()[0] if str(exc) else type(exc).__name__
            raise FtError(f"push to {repo} failed: {msg}") from None
    return str(getattr(info, "commit_url", info))
