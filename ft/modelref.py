"""Where a model comes from: a Hub id, a local directory, or `builtin:tiny-qwen2` (built offline).

A Hub id is checked with one request before transformers sees it: huggingface_hub retries a file it
does not have cached five times with backoff (~25 s per file, one warning line per try), so an
unreachable Hub would otherwise cost a minute of retry lines before any error. One failed request
is enough to know: use the model's cached snapshot if there is one, else say so in one line.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from ft.errors import FtError


def is_builtin(name_or_path: str) -> bool:
    return name_or_path.startswith("builtin:")


def resolve_model_path(name_or_path: str, revision: str | None = None) -> str:
    """A local directory or Hub id that transformers can load; builds built-in models on first use.

    For a Hub id while the Hub cannot be reached, the directory of its cached snapshot (at `revision`).
    """
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
    if offline():
        return name_or_path  # transformers reads the cache itself, without a request
    return _hub_source(name_or_path, revision)


@functools.lru_cache(maxsize=16)
def _hub_source(repo_id: str, revision: str | None) -> str:
    """`repo_id` when the Hub answers; its cached snapshot when the Hub cannot be reached; else FtError."""
    import httpx
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        return repo_id
    try:
        # One request, no retries (retry_on_errors defaults to False).
        get_hf_file_metadata(
            hf_hub_url(repo_id, "config.json", revision=revision), timeout=constants.HF_HUB_ETAG_TIMEOUT
        )
        return repo_id
    except httpx.TransportError as exc:  # refused, unresolvable, timed out, proxy or TLS failure
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        if status is None or status < 500:
            return repo_id  # the Hub answered (missing, gated, ...): transformers says what is wrong
        reason = f"HTTP {status}"
    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if isinstance(cached, str):
        return str(Path(cached).parent)
    raise FtError(
        f"model.name_or_path: cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({reason}) to download "
        f"{repo_id!r}, and it is not in the local cache ({constants.HF_HUB_CACHE}); connect and run again "
        "(then HF_HUB_OFFLINE=1 uses the cached copy), or point model.name_or_path at a local directory"
    )


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
    path = resolve_model_path(name_or_path, revision)  # first: fails fast, before transformers loads
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _not_found(name_or_path, exc) from None


def load_tokenizer(
    name_or_path: str,
    revision: str | None = None,
    trust_remote_code: bool = False,
    *,
    chat_template: str | None = None,
):
    """The model's tokenizer with a pad token and a chat template (`chat_template`: the value of
    data.chat_template, ft.data.chat_templates), or a clear error."""
    from ft.data import chat_templates

    chosen = chat_templates.resolve(chat_template)  # a bad name or file fails before any download
    path = resolve_model_path(name_or_path, revision)  # first: fails fast, before transformers loads
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _not_found(name_or_path, exc) from None
    if tok.pad_token is None:
        # Padding positions are masked out of attention and loss, so reusing EOS is safe.
        tok.pad_token = tok.eos_token
    chat_templates.apply(tok, chosen, model=name_or_path)
    return tok


def recipe_tokenizer(settings):
    """The tokenizer of a recipe, for every stage (data check, training, eval, export): the model's,
    with data.chat_template applied. Load it through here so no stage renders with another template."""
    m = settings.model
    return load_tokenizer(
        m.name_or_path, m.revision, m.trust_remote_code, chat_template=settings.data.chat_template
    )


def adapter_tokenizer(settings, adapter_dir: str | os.PathLike):
    """The tokenizer saved with an adapter: the one it was trained with, chat template included, even when
    a template file the recipe names has moved since. The recipe's when the directory holds none."""
    folder = Path(adapter_dir)
    if not (folder / "tokenizer_config.json").is_file():
        return recipe_tokenizer(settings)
    from transformers import AutoTokenizer

    from ft.data import chat_templates

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=settings.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise FtError(f"{folder}: cannot load the adapter's tokenizer: {str(exc).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    chat_templates.apply(tok, None, model=str(folder))
    return tok
