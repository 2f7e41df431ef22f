"""Examples to training rows: token ids, and labels that are -100 everywhere the model should not learn.

The method works for any chat template, without `{% generation %}` markers: render the whole
conversation once, tokenise it with character offsets, and locate each assistant turn by rendering
the conversation up to it. `messages[:i]` with the generation prompt ends exactly where the assistant's
content starts; `messages[:i+1]` ends after whatever the template closes the turn with (`<|im_end|>`
and a newline for ChatML). So the label span is the content plus the end-of-turn tokens (the model must
learn to stop) but never the `<|im_start|>assistant\\n` header, which the prompt already supplies.

This relies on templates rendering incrementally (each shorter conversation renders to a prefix of
the longer one). Templates that rewrite earlier turns (e.g. dropping past reasoning) break that; it is
checked for every row and refused with a clear error rather than mislabelled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ft.errors import FtError
from ft.progress import bar

IGNORE = -100  # the label value PyTorch's cross-entropy skips
BATCH = 1024  # rows rendered and tokenised per call (the fast tokenizer parallelises inside a batch)
_SENTINEL = "\x00ft-content\x00"

Messages = list[dict[str, str]]


# -- rendering -----------------------------------------------------------------------------------------
def render_chats(
    tokenizer: Any, conversations: Sequence[Messages], *, add_generation_prompt: bool = False
) -> list[str]:
    """Render many conversations with the tokenizer's chat template in one call."""
    if not conversations:
        return []
    texts = tokenizer.apply_chat_template(
        list(conversations), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return list(texts)


def render_each(
    tokenizer: Any,
    conversations: Sequence[Messages],
    on_error: Callable[[int, Exception], None],
    *,
    add_generation_prompt: bool = False,
) -> list[str | None]:
    """Like `render_chats`, but a conversation the template rejects becomes None (reported via `on_error`).

    The batch is tried first; only when the template raises is it retried row by row to find the culprits.
    """
    try:
        return list(render_chats(tokenizer, conversations, add_generation_prompt=add_generation_prompt))
    except Exception:  # noqa: BLE001 - templates raise anything (TemplateError, ValueError, TypeError ...)
        pass
    out: list[str | None] = []
    for index, conversation in enumerate(conversations):
        try:
            out.append(
                render_chats(tokenizer, [conversation], add_generation_prompt=add_generation_prompt)[0]
            )
        except Exception as exc:  # noqa: BLE001
            on_error(index, exc)
            out.append(None)
    return out


def template_problem(exc: Exception) -> str:
    """One line saying why the chat template refused a row."""
    text = str(exc).strip().splitlines()
    return f"the model's chat template rejected this row: {text[0] if text else type(exc).__name__}"


def generation_header(tokenizer: Any) -> str:
    """What the template puts before an assistant turn that opens the conversation (text rows).

    `apply_chat_template` refuses an empty conversation, so render a lone assistant turn around a
    sentinel and keep what comes before it.
    """
    text = render_chats(tokenizer, [[{"role": "assistant", "content": _SENTINEL}]])[0]
    cut = text.find(_SENTINEL)
    if cut < 0:
        raise FtError(
            "the model's chat template drops the content of a lone assistant turn; text rows cannot be used"
        )
    return text[:cut]


def token_lengths(tokenizer: Any, texts: list[str]) -> list[int]:
    """Token counts of already-rendered texts (the template has added any special tokens itself)."""
    if not texts:
        return []
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return [len(row) for row in ids]


# -- assistant spans -----------------------------------------------------------------------------------
def _not_incremental(example: Any, turn: int) -> FtError:
    return FtError(
        f"{example.id}: the chat template does not render conversations incrementally (the text before "
        f"assistant turn messages[{turn}] changes once later turns are added), so assistant tokens cannot be "
        "located; set train.assistant_only_loss=false or use a model whose template renders turn by turn"
    )


def assistant_spans(
    tokenizer: Any, examples: Sequence[Any], fulls: Sequence[str]
) -> list[list[tuple[int, int]]]:
    """Character spans `[start, end)` of every assistant turn in each rendered conversation."""
    starts: list[tuple[int, int, Messages]] = []  # (row, turn, messages before the turn)
    ends: list[tuple[int, int, Messages]] = []  # (row, turn, messages up to and including the turn)
    for row, example in enumerate(examples):
        messages = example.messages
        last = len(messages) - 1
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if turn:
                starts.append((row, turn, messages[:turn]))
            if turn != last:
                ends.append((row, turn, messages[: turn + 1]))
    start_texts = render_chats(tokenizer, [m for _, _, m in starts], add_generation_prompt=True)
    end_texts = render_chats(tokenizer, [m for _, _, m in ends])
    opens_with_answer = any(ex.messages[0]["role"] == "assistant" for ex in examples)  # text rows
    header = generation_header(tokenizer) if opens_with_answer else ""

    start_at = {(row, turn): text for (row, turn, _), text in zip(starts, start_texts, strict=True)}
    end_at = {(row, turn): text for (row, turn, _), text in zip(ends, end_texts, strict=True)}
    spans: list[list[tuple[int, int]]] = []
    for row, (example, full) in enumerate(zip(examples, fulls, strict=True)):
        row_spans = []
        last = len(example.messages) - 1
        for turn, message in enumerate(example.messages):
            if message["role"] != "assistant":
                continue
            before = start_at.get((row, turn), header)
            through = end_at.get((row, turn), full) if turn != last else full
            if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
                raise _not_incremental(example, turn)
            row_spans.append((len(before), len(through)))
        spans.append(row_spans)
    return spans


def label_tokens(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Copy ids whose first character falls inside an assistant span; -100 elsewhere."""
    labels = [IGNORE] * len(ids)
    span = 0
    for position, (char_start, _char_end) in enumerate(offsets):
        while span < len(spans) and char_start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        if char_start >= spans[span][0]:
            labels[position] = ids[position]
    return labels


# -- encoding ------------------------------------------------------------------------------------------
def encode(
    examples: Sequence[Any],
    tokenizer: Any,
    max_seq_length: int,
    too_long: str = "truncate",
    assistant_only: bool = True,
    *,
    stats: dict[str, int] | None = None,
) -> list[dict[str, list[int]]]:
    """Training rows `{"input_ids", "labels"}` for `examples` (ft.data.Example).

    Rows longer than `max_seq_length` follow `too_long`: `drop`, `error`, or `truncate` (keep the start;
    a row left without any label token teaches nothing and is dropped). `stats`, when given, receives
    counts of what happened.
    """
    counts = {
        "rows_in": len(examples),
        "rows_out": 0,
        "truncated": 0,
        "dropped_too_long": 0,
        "dropped_no_labels": 0,
    }
    rows: list[dict[str, list[int]]] = []
    with bar(len(examples), "encode", "row") as progress:
        for lo in range(0, len(examples), BATCH):
            batch = examples[lo : lo + BATCH]
            fulls = render_chats(tokenizer, [ex.messages for ex in batch])
            spans = assistant_spans(tokenizer, batch, fulls) if assistant_only else None
            enc = _tokenize_with_offsets(tokenizer, fulls, want_offsets=assistant_only)
            for k, example in enumerate(batch):
                ids = enc["input_ids"][k]
                offsets = enc["offset_mapping"][k] if spans is not None else None
                labels = label_tokens(ids, offsets, spans[k]) if spans is not None else list(ids)
                row = _fit(example, ids, labels, max_seq_length, too_long, counts)
                if row is not None:
                    rows.append(row)
            progress.update(len(batch))
    counts["rows_out"] = len(rows)
    if stats is not None:
        stats.update(counts)
    return rows


def _tokenize_with_offsets(tokenizer: Any, texts: list[str], *, want_offsets: bool) -> Any:
    try:
        return tokenizer(
            texts, add_special_tokens=False, return_attention_mask=False, return_offsets_mapping=want_offsets
        )
    except NotImplementedError:
        raise FtError(
            "the model's tokenizer is a slow (Python) tokenizer without character offsets; "
            "assistant-only loss needs a fast tokenizer (tokenizer.json)"
        ) from None


def _fit(
    example: Any, ids: list[int], labels: list[int], max_len: int, too_long: str, counts: dict[str, int]
) -> dict[str, list[int]] | None:
    if len(ids) > max_len:
        if too_long == "error":
            raise FtError(
                f"{example.id}: {len(ids)} tokens, longer than train.max_seq_length ({max_len}) "
                "and data.too_long is error"
            )
        if too_long == "drop":
            counts["dropped_too_long"] += 1
            return None
        ids, labels = ids[:max_len], labels[:max_len]
        counts["truncated"] += 1
    if all(label == IGNORE for label in labels):
        counts["dropped_no_labels"] += 1
        return None
    return {"input_ids": ids, "labels": labels}


def prompt_and_reference(example: Any, tokenizer: Any) -> tuple[str, str]:
    """The eval prompt (every turn before the final answer, plus the generation prompt) and that answer."""
    messages = example.messages
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    before = messages[:last]
    prompt = (
        render_chats(tokenizer, [before], add_generation_prompt=True)[0]
        if before
        else generation_header(tokenizer)
    )
    return prompt, messages[last]["content"]
