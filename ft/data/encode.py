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

Tool rows render with `apply_chat_template(messages, tools=...)`: an assistant turn's `tool_calls` are
part of its span, so the loss covers the calls the template writes. `tools` is one argument per call,
so conversations are rendered in groups that share their tools. Reasoning kept under data.reasoning
goes to the template as `reasoning_content` when the template renders that key, else it is written
into the turn's content as `<think>...</think>` (the inline form reasoning models are trained on).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ft.errors import FtError
from ft.progress import bar

IGNORE = -100  # the label value PyTorch's cross-entropy skips
BATCH = 1024  # rows rendered and tokenised per call (the fast tokenizer parallelises inside a batch)
_SENTINEL = "\x00ft-content\x00"
_PROBE_TOOL = "ft_probe_tool_7f3a"
_PROBE_ARG = "ft_probe_argument_7f3a"
THINK_OPEN, THINK_CLOSE = "<think>\n", "\n</think>\n\n"

Messages = list[dict[str, Any]]
Tools = list[dict[str, Any]] | None


# -- rendering -----------------------------------------------------------------------------------------
def render_chats(
    tokenizer: Any,
    conversations: Sequence[Messages],
    *,
    add_generation_prompt: bool = False,
    tools: Sequence[Tools] | None = None,
) -> list[str]:
    """Render many conversations with the tokenizer's chat template, one call per distinct `tools`.

    `tools`, when given, holds each conversation's tool definitions (None: no tools)."""
    if not conversations:
        return []
    from ft.data.tools import tools_text

    conversations = [_for_template(tokenizer, c) for c in conversations]
    if tools is None or not any(tools):
        return _render(tokenizer, conversations, add_generation_prompt, None)
    groups: dict[str, list[int]] = {}
    for index, row_tools in enumerate(tools):
        groups.setdefault(tools_text(row_tools), []).append(index)
    out: list[str] = [""] * len(conversations)
    for members in groups.values():
        texts = _render(
            tokenizer, [conversations[i] for i in members], add_generation_prompt, tools[members[0]]
        )
        for i, text in zip(members, texts, strict=True):
            out[i] = text
    return out


def _render(
    tokenizer: Any, conversations: list[Messages], add_generation_prompt: bool, tools: Tools
) -> list[str]:
    extra = {"tools": tools} if tools else {}
    texts = tokenizer.apply_chat_template(
        conversations, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
    )
    return list(texts)


def _for_template(tokenizer: Any, messages: Messages) -> Messages:
    """The messages as this template wants them: reasoning inlined unless it reads `reasoning_content`."""
    if not any("reasoning_content" in m for m in messages) or renders_reasoning(tokenizer):
        return messages
    out = []
    for m in messages:
        if "reasoning_content" in m:
            thought = m["reasoning_content"]
            m = {k: v for k, v in m.items() if k != "reasoning_content"}
            m["content"] = f"{THINK_OPEN}{thought}{THINK_CLOSE}{m['content']}"
        out.append(m)
    return out


_REASONING_RENDERED: dict[str, bool] = {}


def renders_reasoning(tokenizer: Any) -> bool:
    """Whether the chat template writes an assistant turn's `reasoning_content` (probed once per template)."""
    template = str(getattr(tokenizer, "chat_template", None))
    if template not in _REASONING_RENDERED:
        probe = [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": "y", "reasoning_content": _PROBE_ARG},
        ]
        try:
            text = _render(tokenizer, [probe], False, None)[0]
        except Exception:  # noqa: BLE001 - a template that chokes on the key does not render it
            text = ""
        _REASONING_RENDERED[template] = _PROBE_ARG in text
    return _REASONING_RENDERED[template]


def render_each(
    tokenizer: Any,
    conversations: Sequence[Messages],
    on_error: Callable[[int, Exception], None],
    *,
    add_generation_prompt: bool = False,
    tools: Sequence[Tools] | None = None,
) -> list[str | None]:
    """Like `render_chats`, but a conversation the template rejects becomes None (reported via `on_error`).

    The batch is tried first; only when the template raises is it retried row by row to find the culprits.
    """
    try:
        return list(
            render_chats(tokenizer, conversations, add_generation_prompt=add_generation_prompt, tools=tools)
        )
    except Exception:  # noqa: BLE001 - templates raise anything (TemplateError, ValueError, TypeError ...)
        pass
    out: list[str | None] = []
    for index, conversation in enumerate(conversations):
        one = None if tools is None else [tools[index]]
        try:
            out.append(
                render_chats(
                    tokenizer, [conversation], add_generation_prompt=add_generation_prompt, tools=one
                )[0]
            )
        except Exception as exc:  # noqa: BLE001
            on_error(index, exc)
            out.append(None)
    return out


def tool_support_problem(tokenizer: Any, examples: Sequence[Any]) -> str | None:
    """One line when rows have tools or tool calls that the chat template would silently drop (or refuses).

    The template is asked to render a probe function and a call to it; a template without tool support
    ignores both (the rendered text lacks them) or raises."""
    from ft.data.tools import has_tool_calls

    with_tools = next((ex for ex in examples if getattr(ex, "tools", None)), None)
    with_calls = next((ex for ex in examples if has_tool_calls(ex.messages)), None)
    if with_tools is None and with_calls is None:
        return None
    tool = {
        "type": "function",
        "function": {
            "name": _PROBE_TOOL,
            "description": "probe",
            "parameters": {"type": "object", "properties": {_PROBE_ARG: {"type": "integer"}}},
        },
    }
    call = {"type": "function", "function": {"name": _PROBE_TOOL, "arguments": {_PROBE_ARG: 1}}}
    checks = []
    if with_tools is not None:
        checks.append((with_tools, "tools", [{"role": "user", "content": "x"}], _PROBE_TOOL))
    if with_calls is not None:
        asked = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
        checks.append((with_calls, "tool_calls", asked, _PROBE_ARG))
    for example, what, probe, sentinel in checks:
        try:
            text = _render(tokenizer, [probe], False, [tool])[0]
        except Exception as exc:  # noqa: BLE001 - templates raise anything
            lines = str(exc).strip().splitlines()
            how = f"it fails on them: {lines[0] if lines else type(exc).__name__}"
        else:
            if sentinel in text:
                continue
            how = f"it ignores `{what}`, so the calls would be dropped from the training text"
        count = sum(1 for ex in examples if getattr(ex, "tools", None) or has_tool_calls(ex.messages))
        return (
            f"{example.id}: this row and {count - 1} more have tools or tool calls, but the model's chat "
            f"template has no tool support ({how}); use a model (or chat template) that renders tools"
        )
    return None


def template_problem(exc: Exception) -> str:
    """One line saying why the chat template refused a row."""
    text = str(exc).strip().splitlines()
    return f"the model's chat template rejected this row: {text[0] if text else type(exc).__name__}"


def generation_header(tokenizer: Any) -> str:
    """What the template puts before an assistant turn that opens the conversation (text rows).

    `apply_chat_template` refuses an empty conversation, so render a lone assistant turn around a
    sentinel and keep what comes before it.
    """
    text = _render(tokenizer, [[{"role": "assistant", "content": _SENTINEL}]], False, None)[0]
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
    reasoning = any("reasoning_content" in m for m in example.messages)
    return FtError(
        f"{example.id}: the chat template does not render conversations incrementally (the text before "
        f"assistant turn messages[{turn}] changes once later turns are added), so assistant tokens cannot be "
        "located; set train.assistant_only_loss=false"
        + (" or data.reasoning=drop (templates often drop past turns' reasoning)" if reasoning else "")
        + " or use a model whose template renders turn by turn"
    )


def assistant_spans(
    tokenizer: Any, examples: Sequence[Any], fulls: Sequence[str]
) -> list[list[tuple[int, int]]]:
    """Character spans `[start, end)` of every assistant turn in each rendered conversation."""
    starts: list[tuple[int, int, Messages]] = []  # (row, turn, messages before the turn)
    ends: list[tuple[int, int, Messages]] = []  # (row, turn, messages up to and including the turn)
    row_tools = [getattr(ex, "tools", None) for ex in examples]
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
    start_texts = render_chats(
        tokenizer,
        [m for _, _, m in starts],
        add_generation_prompt=True,
        tools=[row_tools[row] for row, _, _ in starts],
    )
    end_texts = render_chats(tokenizer, [m for _, _, m in ends], tools=[row_tools[row] for row, _, _ in ends])
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
            fulls = render_chats(
                tokenizer, [ex.messages for ex in batch], tools=[getattr(ex, "tools", None) for ex in batch]
            )
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
    """The eval prompt (every turn before the final answer, with the row's tools, plus the generation
    prompt) and that answer.

    An answer that calls tools is given as the template writes it (the rendered turn, decoded without
    special tokens, as a generated answer is), so exact match and token F1 compare like with like; the
    calls themselves are scored as parsed JSON (ft.eval.metrics.tool_call_scores)."""
    messages = example.messages
    tools = getattr(example, "tools", None)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    before = messages[:last]
    prompt = (
        render_chats(tokenizer, [before], add_generation_prompt=True, tools=[tools])[0]
        if before
        else generation_header(tokenizer)
    )
    answer = messages[last]
    if not answer.get("tool_calls"):
        return prompt, answer["content"]
    full = render_chats(tokenizer, [messages[: last + 1]], tools=[tools])[0]
    if not full.startswith(prompt):
        raise _not_incremental(example, last)
    ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    return prompt, tokenizer.decode(ids, skip_special_tokens=True).strip()
