"""Tool-calling rows, content given as a list of parts, and reasoning: read, validate, normalise.

Everything is normalised to the transformers convention, which the models' own chat templates read:

- a row's `tools` is a list of `{"type": "function", "function": {"name", "description", "parameters"}}`
  (a bare `{"name", ...}` function, or the whole list as a JSON string, as LLaMA-Factory's `tools` column
  holds it, is accepted and wrapped);
- an assistant turn that calls tools has `tool_calls`: `[{"type": "function", "function": {"name",
  "arguments"}}]`, its `arguments` a parsed JSON object (templates write it with `tojson`; a JSON string
  there would be rendered as a quoted string), and `content` possibly empty;
- a tool result is `{"role": "tool", "content", "tool_call_id"?, "name"?}`;
- an assistant's reasoning (`reasoning_content`, `reasoning` or `thinking`, as a key or as a part) is
  kept under `reasoning_content`, the key reasoning models' templates read; data.reasoning decides
  whether it stays.

Problems are RowProblems with the path of the field inside the row, e.g.
`messages[2].tool_calls[0].function.arguments: not valid JSON`.
"""

from __future__ import annotations

import json
from typing import Any

from ft.data.shapes import RowProblem, kind, show

REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
TEXT_PARTS = ("text", "input_text", "output_text")
MEDIA_PARTS = {
    "image",
    "image_url",
    "input_image",
    "audio",
    "input_audio",
    "audio_url",
    "video",
    "video_url",
    "file",
    "input_file",
}


# -- content -------------------------------------------------------------------------------------------
def read_content(value: Any, where: str, *, allow_empty: bool = False) -> tuple[str, str | None]:
    """(text, reasoning or None) of a message's content: a string, or a list of parts joined in order.

    Text parts are OpenAI's `{"type": "text", "text"}` and LLaMA-Factory's `{"type": "text", "value"}`;
    reasoning/thinking parts are collected apart; media parts are refused (ft trains text only).
    `allow_empty` accepts a missing or null content (an assistant turn that only calls tools).
    """
    if value is None and allow_empty:
        return "", None
    if isinstance(value, str):
        return value, None
    if not isinstance(value, list):
        raise RowProblem(where, f"expected a string, got {kind(value)} (an array of text parts also works)")
    texts: list[str] = []
    thoughts: list[str] = []
    for i, part in enumerate(value):
        at = f"{where}[{i}]"
        if isinstance(part, str):  # a bare string part: some exporters write those
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise RowProblem(at, f"expected a part object with a type, got {kind(part)}")
        ptype = part.get("type", "text")
        if ptype in MEDIA_PARTS:
            raise RowProblem(
                f"{at}.type",
                f"a part of type {show(ptype)}: ft trains text only; remove image, audio and video parts",
            )
        if ptype in TEXT_PARTS:
            texts.append(_part_text(part, at))
        elif ptype in REASONING_KEYS:
            thoughts.append(_part_text(part, at, ptype))
        else:
            raise RowProblem(f"{at}.type", f"{show(ptype)} is not a text, reasoning or thinking part")
    return "".join(texts), ("".join(thoughts) if thoughts else None)


def _part_text(part: dict[str, Any], at: str, *extra: str) -> str:
    for key in ("text", "value", "content", *extra):
        if key in part:
            text = part[key]
            if not isinstance(text, str):
                raise RowProblem(f"{at}.{key}", f"expected a string, got {kind(text)}")
            return text
    raise RowProblem(at, "a text part needs a `text` (or `value`) string")


def read_reasoning(turn: dict[str, Any], where: str) -> str | None:
    """The reasoning a message carries under one of REASONING_KEYS (None when it has none)."""
    for key in REASONING_KEYS:
        if key in turn and turn[key] is not None:
            value = turn[key]
            if not isinstance(value, str):
                raise RowProblem(f"{where}.{key}", f"expected a string, got {kind(value)}")
            return value
    return None


# -- tools ---------------------------------------------------------------------------------------------
def read_tools(value: Any, where: str = "tools") -> list[dict[str, Any]] | None:
    """A row's tool definitions, normalised; None when the row gives none (missing, null, "" or [])."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise RowProblem(where, "not valid JSON (a tools string must hold a JSON array)") from None
        if isinstance(value, dict):
            value = [value]
    if not isinstance(value, list):
        raise RowProblem(where, f"expected an array of function definitions, got {kind(value)}")
    tools: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, tool in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(tool, dict):
            raise RowProblem(at, f"expected a function definition object, got {kind(tool)}")
        function, at, name = _function(tool, at, "tools", "an object")
        if name in seen:
            raise RowProblem(f"{at}.name", f"{show(name)} is defined twice")
        seen.add(name)
        params = function.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise RowProblem(f"{at}.parameters", f"expected a JSON Schema object, got {kind(params)}")
        tools.append({"type": "function", "function": function})
    return tools


def read_tool_calls(value: Any, where: str, names: list[str] | None) -> list[dict[str, Any]]:
    """An assistant turn's `tool_calls`, normalised; each name must be one of `names` when tools are given."""
    if not isinstance(value, list):
        raise RowProblem(where, f"expected an array of tool calls, got {kind(value)}")
    if not value:
        raise RowProblem(where, "empty array of tool calls")
    calls = []
    for i, call in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(call, dict):
            raise RowProblem(at, f"expected a tool call object, got {kind(call)}")
        normal = _call(call, at, names)
        if "id" in call and call["id"] is not None:
            if not isinstance(call["id"], str):
                raise RowProblem(f"{at}.id", f"expected a string, got {kind(call['id'])}")
            normal["id"] = call["id"]
        calls.append(normal)
    return calls


def _function(obj: dict[str, Any], at: str, what: str, expected: str) -> tuple[dict[str, Any], str, str]:
    """(function object, its field path, its name) of a tool or a call, OpenAI-wrapped (`{"type":
    "function", "function": {...}}`) or bare."""
    if "function" in obj:
        if obj.get("type", "function") != "function":
            raise RowProblem(f"{at}.type", f"{show(obj['type'])}: only function {what} are supported")
        function, at = obj["function"], f"{at}.function"
        if not isinstance(function, dict):
            raise RowProblem(at, f"expected {expected}, got {kind(function)}")
    else:
        function = obj
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RowProblem(f"{at}.name", "missing" if name is None else "expected a function name string")
    return function, at, name


def _call(call: dict[str, Any], at: str, names: list[str] | None) -> dict[str, Any]:
    function, at, name = _function(call, at, "calls", "an object with name and arguments")
    if names is not None and name not in names:
        known = ", ".join(names) or "none"
        raise RowProblem(f"{at}.name", f"{show(name)} is not one of the row's tools ({known})")
    return {"type": "function", "function": {"name": name, "arguments": _arguments(function, at)}}


def _arguments(function: dict[str, Any], at: str) -> dict[str, Any]:
    where = f"{at}.arguments"
    args = function.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise RowProblem(where, "not valid JSON") from None
    if not isinstance(args, dict):
        raise RowProblem(where, f"expected a JSON object, got {kind(args)}")
    return args


def read_function_call_value(value: str, where: str, names: list[str] | None) -> list[dict[str, Any]]:
    """LLaMA-Factory's `function_call` turn: a JSON string `{"name", "arguments"}` (or an array of them)."""
    try:
        parsed = json.loads(value)
    except ValueError:
        raise RowProblem(
            where, 'not valid JSON (a function_call turn holds {"name": ..., "arguments": ...})'
        ) from None
    calls = parsed if isinstance(parsed, list) else [parsed]
    out = []
    for i, call in enumerate(calls):
        at = f"{where}[{i}]" if isinstance(parsed, list) else where
        if not isinstance(call, dict):
            raise RowProblem(at, f'expected {{"name": ..., "arguments": ...}}, got {kind(call)}')
        out.append(_call(call, at, names))
    if not out:
        raise RowProblem(where, "empty array of tool calls")
    return out


# -- facts the rest of ft asks about a conversation ----------------------------------------------------
def has_tool_calls(messages: list[dict[str, Any]]) -> bool:
    return any(m.get("tool_calls") for m in messages)


def identity_text(message: dict[str, Any]) -> str:
    """A message's whole text for identity (duplicates, leakage): content, reasoning and tool calls."""
    extra = [message["content"]]
    if message.get("reasoning_content"):
        extra.append(message["reasoning_content"])
    if message.get("tool_calls"):
        extra.append(json.dumps(message["tool_calls"], sort_keys=True, ensure_ascii=False))
    if message.get("tool_call_id") or message.get("name"):
        extra.append(f"{message.get('tool_call_id', '')}\x1d{message.get('name', '')}")
    return "\x1d".join(extra)


def tools_text(tools: list[dict[str, Any]] | None) -> str:
    return "" if not tools else json.dumps(tools, sort_keys=True, ensure_ascii=False)


def reference_calls(message: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The `{"name", "arguments"}` calls of an answer turn, or None when it calls no tool."""
    calls = message.get("tool_calls")
    if not calls:
        return None
    return [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls]
