"""Row shapes: detect them, normalise them to chat messages, and validate the conversation.

Every shape becomes a list of `{"role", "content"}` messages, the one form the rest of ft knows, plus
the transformers convention's extras where a row has them (ft.data.tools): a row's `tools`, an assistant
turn's `tool_calls` and `reasoning_content`, a tool turn's `tool_call_id` and `name`. Content may be
given as a list of text parts (joined in order).

- `messages`          chat rows, roles system/user/assistant/tool (OpenAI / TRL conversational), with an
                      optional `tools` list and structured `tool_calls`.
- `sharegpt`          `conversations` of `{"from", "value"}`; human->user, gpt->assistant,
                      function_call->assistant (its value a JSON `{"name", "arguments"}` call, or an
                      array of them, as LLaMA-Factory writes it; a value that is not JSON at all is
                      kept as plain text), observation->tool; optional `system` and `tools` columns.
- `alpaca`            instruction (+ input) -> user, output -> assistant; optional `system` and
                      `history` ([[user, assistant], ...] turns that came before).
- `prompt_completion` prompt -> user, completion -> assistant (each may also be a list of messages).
- `text`              a single assistant message holding the whole text. A text row has no prompt and
                      should train on every token; as the assistant turn it is unmasked under
                      assistant-only loss, goes through the same chat template as everything else (so
                      the model sees the text where it will produce text), and the rule "a conversation
                      ends with an assistant turn" holds for every row.

Problems are raised as `RowProblem(field, problem)`; the caller adds the file and line. Only the first
problem of a row is reported: later ones are often consequences of it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "gpt": "assistant",
    "function_call": "assistant",
    "observation": "tool",
}
SHAPES = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
_WITH_TOOLS = ("messages", "sharegpt", "prompt_completion")  # the shapes whose rows may carry `tools`
Messages = list[dict[str, Any]]
FieldName = Callable[[int, str], str]  # (message index, "role" | "content") -> field path for errors


class RowProblem(Exception):
    """One problem with one row; `field` is a path inside the row such as `messages[1].role`."""

    def __init__(self, field: str | None, problem: str):
        super().__init__(problem)
        self.field = field
        self.problem = problem


def kind(value: Any) -> str:
    """The JSON name of a value's type, as a user who wrote the JSON would call it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def show(value: Any, limit: int = 40) -> str:
    """A short, single-line rendering of a user's value for an error message."""
    if not isinstance(value, str):
        return kind(value)
    text = repr(value if len(value) <= limit else value[:limit] + "...")
    return text.replace("\n", "\\n")


# -- detection -----------------------------------------------------------------------------------------
def detect_shape(row: dict[str, Any]) -> str:
    """The shape of one row from its keys (extra keys such as ids or metadata are ignored)."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row or "output" in row:
        return "alpaca"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    keys = ", ".join(show(k, 20) for k in list(row)[:6]) or "none"
    raise RowProblem(
        None,
        "not a known row shape: expected messages, conversations, instruction/output, "
        f"prompt/completion or text (keys: {keys})",
    )


@dataclass(slots=True)
class Row:
    """One normalised row: its shape, its messages, where its final answer is, and its tools (or None)."""

    shape: str
    messages: Messages
    answer_field: str
    tools: list[dict[str, Any]] | None = None


def normalise(row: Any, shape: str) -> tuple[str, Messages, str]:
    """(shape, messages, field of the final answer) for one row; `shape` may be `auto`. Or a RowProblem."""
    r = normalise_row(row, shape)
    return r.shape, r.messages, r.answer_field


def normalise_row(row: Any, shape: str) -> Row:
    """The normalised row, tools included; `shape` may be `auto`. Or a RowProblem."""
    if not isinstance(row, dict):
        raise RowProblem(None, f"expected a JSON object, got {kind(row)}")
    if shape == "auto":
        shape = detect_shape(row)
    tools = None
    if shape in _WITH_TOOLS and "tools" in row:
        from ft.data.tools import read_tools

        tools = read_tools(row["tools"])
    messages, answer_field = NORMALISERS[shape](row, tools)
    return Row(shape, messages, answer_field, tools)


# -- field helpers -------------------------------------------------------------------------------------
def _string(container: dict[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    if key not in container:
        if required:
            raise RowProblem(where, "missing")
        return None
    value = container[key]
    if not isinstance(value, str):
        if not required and value is None:
            return None
        raise RowProblem(where, f"expected a string, got {kind(value)}")
    return value


def _require_key(row: dict[str, Any], key: str, shape: str) -> Any:
    if key not in row:
        raise RowProblem(key, f"missing ({shape} rows need it)")
    return row[key]


# -- shapes --------------------------------------------------------------------------------------------
def _message_list(
    turns: Any,
    key: str,
    role_key: str,
    content_key: str,
    roles: dict[str, str],
    tools: list[dict[str, Any]] | None = None,
) -> Messages:
    """Read a list of message objects whose role lives in `role_key` (mapped through `roles`)."""
    if not isinstance(turns, list):
        raise RowProblem(key, f"expected an array of messages, got {kind(turns)}")
    if not turns:
        raise RowProblem(key, "empty conversation")
    names = None if tools is None else [t["function"]["name"] for t in tools]
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RowProblem(where, f"expected an object with {role_key} and {content_key}, got {kind(turn)}")
        given = _string(turn, role_key, f"{where}.{role_key}")
        if given not in roles:
            raise RowProblem(f"{where}.{role_key}", f"{show(given)} is not one of {', '.join(roles)}")
        messages.append(_message(turn, given, roles[given], where, content_key, names))
    return messages


def _message(
    turn: dict[str, Any], given: str, role: str, where: str, content_key: str, names: list[str] | None
) -> dict[str, Any]:
    """One message in the transformers convention (tool calls, reasoning and parts read by ft.data.tools)."""
    content = turn.get(content_key)
    if len(turn) == 2 and type(content) is str and given != "function_call":
        return {"role": role, "content": content}  # the common case, kept fast for large data sets
    from ft.data import tools as t

    at = f"{where}.{content_key}"
    if given == "function_call":
        value = _string(turn, content_key, at)
        if value.lstrip()[:1] in ("{", "["):  # LLaMA-Factory's JSON call; other text stays plain text
            return {"role": role, "content": "", "tool_calls": t.read_function_call_value(value, at, names)}
    calls = turn.get("tool_calls")
    if calls is not None and role != "assistant":
        raise RowProblem(f"{where}.tool_calls", f"only assistant turns call tools, not {role}")
    calling = calls is not None and calls != []
    if content_key not in turn and not calling:
        raise RowProblem(at, "missing")
    content, thought = t.read_content(turn.get(content_key), at, allow_empty=calling)
    message: dict[str, Any] = {"role": role, "content": content}
    reasoning = t.read_reasoning(turn, where)
    if thought is not None:
        reasoning = thought if reasoning is None else reasoning + thought
    if reasoning is not None:
        if role != "assistant":
            raise RowProblem(where, f"reasoning is only read in assistant turns, not {role}")
        message["reasoning_content"] = reasoning
    if calling:
        message["tool_calls"] = t.read_tool_calls(calls, f"{where}.tool_calls", names)
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if turn.get(key) is not None:
                message[key] = _string(turn, key, f"{where}.{key}")
    return message


_CHAT_ROLES = {r: r for r in ROLES}


def _from_messages(row: dict[str, Any], tools: Any = None) -> tuple[Messages, str]:
    messages = _message_list(
        _require_key(row, "messages", "messages"), "messages", "role", "content", _CHAT_ROLES, tools
    )
    check_turns(messages, lambda i, attr: f"messages[{i}].{attr}")
    return messages, _answer_field(messages, lambda i, attr: f"messages[{i}].{attr}")


def _answer_field(messages: Messages, name: FieldName) -> str:
    last = len(messages) - 1
    return name(last, "tool_calls" if messages[last].get("tool_calls") else "content")


def _from_sharegpt(row: dict[str, Any], tools: Any = None) -> tuple[Messages, str]:
    turns = _require_key(row, "conversations", "sharegpt")
    messages = _message_list(turns, "conversations", "from", "value", SHAREGPT_ROLES, tools)
    attrs = {"role": "from", "content": "value", "tool_calls": "value"}
    system = _string(row, "system", "system", required=False)
    offset = 0
    if system and messages[0]["role"] != "system":  # LLaMA-Factory's `system` column
        messages.insert(0, {"role": "system", "content": system})
        offset = 1

    def name(i: int, attr: str) -> str:
        return "system" if i < offset else f"conversations[{i - offset}].{attrs[attr]}"

    check_turns(messages, name)
    return messages, name(len(messages) - 1, "content")


def _from_alpaca(row: dict[str, Any], tools: Any = None) -> tuple[Messages, str]:
    instruction = _string(row, "instruction", "instruction")
    extra = _string(row, "input", "input", required=False)
    output = _string(row, "output", "output")
    system = _string(row, "system", "system", required=False)
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    if not prompt.strip():
        raise RowProblem("instruction", "empty instruction")
    if not output.strip():
        raise RowProblem("output", "empty assistant turn")
    messages: Messages = [{"role": "system", "content": system}] if system else []
    messages += _alpaca_history(row.get("history"))
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return messages, "output"


def _alpaca_history(history: Any) -> Messages:
    if history is None:
        return []
    if not isinstance(history, list):
        raise RowProblem("history", f"expected an array of [user, assistant] pairs, got {kind(history)}")
    messages: Messages = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise RowProblem(f"history[{i}]", "expected a [user, assistant] pair of strings")
        if not pair[1].strip():
            raise RowProblem(f"history[{i}][1]", "empty assistant turn")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages


def _from_prompt_completion(row: dict[str, Any], tools: Any = None) -> tuple[Messages, str]:
    prompt = _require_key(row, "prompt", "prompt/completion")
    completion = _require_key(row, "completion", "prompt/completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise RowProblem("completion", "empty assistant turn")
        return [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": completion},
        ], "completion"
    # The conversational form: both sides are lists of messages.
    for key, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, str | list):
            raise RowProblem(key, f"expected a string or an array of messages, got {kind(value)}")
        if isinstance(value, str):
            raise RowProblem(
                key, "a string, but the other side is an array of messages; use the same form for both"
            )
    head = _message_list(prompt, "prompt", "role", "content", _CHAT_ROLES, tools)
    tail = _message_list(completion, "completion", "role", "content", _CHAT_ROLES, tools)
    split = len(head)

    def name(i: int, attr: str) -> str:
        return f"prompt[{i}].{attr}" if i < split else f"completion[{i - split}].{attr}"

    messages = head + tail
    check_turns(messages, name)
    return messages, _answer_field(messages, name)


def _from_text(row: dict[str, Any], tools: Any = None) -> tuple[Messages, str]:
    text = _string(row, "text", "text")
    if not text.strip():
        raise RowProblem("text", "empty text")
    return [{"role": "assistant", "content": text}], "text"


NORMALISERS: dict[str, Callable[[dict[str, Any], Any], tuple[Messages, str]]] = {
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion,
    "text": _from_text,
}

# Which roles may follow which: user and assistant alternate; tool results follow an assistant turn
# (a tool call) or another tool result, and are answered by the assistant.
_NEXT = {
    None: ("user",),
    "system": ("user",),
    "user": ("assistant",),
    "assistant": ("user", "tool"),
    "tool": ("tool", "assistant"),
}


def check_turns(messages: Messages, name: FieldName) -> None:
    """System only first, user/assistant alternating, tools after the assistant, ending on the assistant.

    An assistant turn may be empty only when it calls tools."""
    previous: str | None = None
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system" and i:
            raise RowProblem(name(i, "role"), "a system turn is only allowed first")
        if role != "system" and role not in _NEXT[previous]:
            raise RowProblem(name(i, "role"), _order_problem(previous, role))
        if role == "assistant" and not message["content"].strip() and not message.get("tool_calls"):
            raise RowProblem(name(i, "content"), "empty assistant turn")
        previous = role
    if previous != "assistant":
        last = len(messages) - 1
        raise RowProblem(
            name(last, "role"), f"the conversation must end with an assistant turn, not {previous}"
        )


def _order_problem(previous: str | None, role: str) -> str:
    if previous in (None, "system"):
        return f"the conversation must start with a user turn (after an optional system turn), not {role}"
    if role == "tool":
        return f"a tool turn must follow an assistant turn (a tool call), not {previous}"
    return f"expected {' or '.join(_NEXT[previous])} after {previous}, got {role} (turns must alternate)"


# -- labels --------------------------------------------------------------------------------------------
def extract_label(answer: str, label_field: str, field: str) -> str:
    """The class label: key `label_field` of the JSON object the final answer holds."""
    try:
        parsed = json.loads(answer)
    except (ValueError, RecursionError):
        raise RowProblem(field, f"the answer is not JSON, but data.label_field is {label_field!r}") from None
    if not isinstance(parsed, dict):
        raise RowProblem(field, f"the answer is a JSON {kind(parsed)}, not an object with {label_field!r}")
    if label_field not in parsed:
        raise RowProblem(field, f"the answer has no {label_field!r} key (data.label_field)")
    value = parsed[label_field]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RowProblem(field, f"{label_field!r} must be a string, got {kind(value)}")
    return str(value)
