"""Where a model comes from: a Hub id, a local directory, or `builtin:tiny-qwen2` (built offline)."""

from __future__ import annotations

import os
from pathlib import Path

from ft.errors import FtError


def is_builtin(name_or_path: str) -> bool:
    return name_or_path.startswith("builtin:")


def resolve_model_path(name_or_path: str) -> str:
    """A local directory or Hub id that transformers can load; builds built-in models on first use."""
    if is_builtin(name_or_path):
        from ft.testing import TINY_MODEL, ensure_tiny_model

        if name_or_path != TINY_MODEL:
            raise FtError(
                f"model.name_or_path: unknown built-in model {name_or_path!r}; the only one is {TINY_MODEL!r}"
            )
        return str(ensure_tiny_model())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FtError(f"model.name_or_path: {path} is a file; give the model's directory")
        if not (path / "config.json").is_file():
            raise FtError(
                f"model.name_or_path: {path} has no config.json; is it a Hugging Face model directory?"
            )
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FtError(f"model.name_or_path: {name_or_path}: no such directory")
    return name_or_path


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get(
        "TRANSFORMERS_OFFLINE", ""
    ) not in (
        "",
        "0",
    )


def _not_found(name: str, exc: Exception) -> FtError:
    if offline():
        return FtError(
            f"model.name_or_path: {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            "download it once with network access or point to a local directory"
        )
    return FtError(f"model.name_or_path: cannot load {name!r}: {str(exc).splitlines()[0]}")


def load_config(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _not_found(name_or_path, exc) from None


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model's tokenizer with a pad token and a chat template, or a clear error."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _not_found(name_or_path, exc) from None
    if tok.pad_token is None:
        # Padding positions are masked out of attention and loss, so reusing EOS is safe.
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        raise FtError(
            f"model.name_or_path: {name_or_path!r} has no chat template; use an instruct/chat model "
            "or a tokenizer that defines one"
        )
    return tok
