"""A small subset of Go's text/template, enough to render the Modelfile TEMPLATEs that ft writes.

Ollama renders a Modelfile's TEMPLATE with Go's text/template; ft checks its TEMPLATE against the
tokenizer's chat template without Ollama, so it needs a renderer of its own. Supported: text, `{{- -}}`
trim markers, fields (`.Messages`, `.Role`, `$.System`), variables (`$x := …`, `$x = …`), `if` /
`else if` / `else` / `end`, `range` over a list (with `$i, $m :=`), parentheses, string/bool/int
literals and the functions `eq ne not and or index len`. Anything else raises TemplateError, so a
template this renderer accepts means the same thing to Go (tested in tests/test_export_modelfile.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


class TemplateError(ValueError):
    pass


_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(
    r'\s*(?:(\()|(\))|("(?:[^"\\]|\\.)*")|(\$\w*(?:\.\w+)*)|(\.\w+(?:\.\w+)*|\.)|([\w]+)|(:?=)|(,))'
)


@dataclass
class _Node:
    kind: str  # text | expr | assign | declare | if | range
    value: Any = None
    body: list[_Node] = field(default_factory=list)
    branches: list[tuple[Any, list[_Node]]] = field(default_factory=list)  # if: (cond, body); else: cond None


def _tokens(src: str) -> list[tuple[str, str]]:
    if re.search(r"\)\.\w", src):
        raise TemplateError(f"field access on a parenthesised value is not supported: {src!r}")
    out, pos = [], 0
    names = ("lparen", "rparen", "string", "var", "field", "word", "assign", "comma")
    while pos < len(src):
        if not src[pos:].strip():
            break
        m = _TOKEN.match(src, pos)
        if not m or m.end() == pos:
            raise TemplateError(f"cannot parse action {src!r} at {src[pos:]!r}")
        kind = next(n for n, g in zip(names, m.groups(), strict=True) if g is not None)
        out.append((kind, m.group(m.lastindex)))
        pos = m.end()
    return out


def _parse_expr(toks: list[tuple[str, str]]) -> Any:
    """A pipeline without `|`: a function call with arguments, or a single operand."""
    args, i = [], 0
    while i < len(toks):
        kind, text = toks[i]
        if kind == "lparen":
            depth, j = 1, i + 1
            while j < len(toks) and depth:
                depth += {"lparen": 1, "rparen": -1}.get(toks[j][0], 0)
                j += 1
            if depth:
                raise TemplateError("unbalanced parentheses")
            args.append(_parse_expr(toks[i + 1 : j - 1]))
            i = j
            continue
        if kind in ("rparen", "assign", "comma"):
            raise TemplateError(f"unexpected {text!r}")
        args.append((kind, text))
        i += 1
    if not args:
        raise TemplateError("empty expression")
    head = args[0]
    if (
        isinstance(head, tuple)
        and head[0] == "word"
        and head[1] not in ("true", "false", "nil")
        and not head[1].isdigit()
    ):
        return ("call", head[1], args[1:])
    if len(args) != 1:
        raise TemplateError("arguments given to a value that is not a function")
    return args[0]


def parse(src: str) -> list[_Node]:
    root: list[_Node] = []
    stack: list[tuple[_Node | None, list[_Node]]] = [(None, root)]
    pos = 0
    pending_trim = False
    for m in _ACTION.finditer(src):
        text = src[pos : m.start()]
        if pending_trim:
            text = text.lstrip(" \t\r\n")
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        if text:
            stack[-1][1].append(_Node("text", text))
        pending_trim = bool(m.group(3))
        pos = m.end()
        body = m.group(2).strip()
        if body.startswith("/*"):
            continue
        word, _, rest = body.partition(" ")
        if word == "if":
            node = _Node("if")
            node.branches.append((_parse_expr(_tokens(rest)), []))
            stack[-1][1].append(node)
            stack.append((node, node.branches[-1][1]))
        elif word == "else":
            node = stack[-1][0]
            if node is None or node.kind != "if":
                raise TemplateError("else outside if")
            cond = None
            if rest.strip():
                sub, _, cond_src = rest.strip().partition(" ")
                if sub != "if":
                    raise TemplateError(f"unsupported else {rest!r}")
                cond = _parse_expr(_tokens(cond_src))
            node.branches.append((cond, []))
            stack[-1] = (node, node.branches[-1][1])
        elif word == "range":
            toks = _tokens(rest)
            names: list[str] = []
            if any(k == "assign" for k, _ in toks):
                k = next(i for i, t in enumerate(toks) if t[0] == "assign")
                names = [t for kind, t in toks[:k] if kind == "var"]
                toks = toks[k + 1 :]
            node = _Node("range", (names, _parse_expr(toks)))
            stack[-1][1].append(node)
            stack.append((node, node.body))
        elif word == "end":
            if len(stack) == 1:
                raise TemplateError("end without if/range")
            stack.pop()
        elif word in ("with", "define", "template", "block", "break", "continue"):
            raise TemplateError(f"{word!r} is not supported by this renderer")
        else:
            toks = _tokens(body)
            if len(toks) >= 2 and toks[0][0] == "var" and toks[1][0] == "assign":
                kind = "declare" if toks[1][1] == ":=" else "assign"
                stack[-1][1].append(_Node(kind, (toks[0][1], _parse_expr(toks[2:]))))
            else:
                stack[-1][1].append(_Node("expr", _parse_expr(toks)))
    tail = src[pos:]
    if pending_trim:
        tail = tail.lstrip(" \t\r\n")
    if tail:
        root.append(_Node("text", tail))
    if len(stack) != 1:
        raise TemplateError("missing {{ end }}")
    return root


def _truth(v: Any) -> bool:
    return bool(v) if v is not None else False


def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, dict):
        if name not in obj:
            raise TemplateError(f"no field {name!r}")
        return obj[name]
    if not hasattr(obj, name):
        raise TemplateError(f"no field {name!r}")
    return getattr(obj, name)


class _Scope:
    def __init__(self, root: Any):
        self.frames: list[dict[str, Any]] = [{"$": root}]

    def get(self, name: str) -> Any:
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise TemplateError(f"undefined variable {name}")

    def set(self, name: str, value: Any) -> None:
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise TemplateError(f"assignment to undeclared variable {name}")


def _eval(expr: Any, dot: Any, scope: _Scope) -> Any:
    if isinstance(expr, tuple) and expr[0] == "call":
        _, name, args = expr
        if name == "and":
            v = None
            for a in args:
                v = _eval(a, dot, scope)
                if not _truth(v):
                    return v
            return v
        if name == "or":
            v = None
            for a in args:
                v = _eval(a, dot, scope)
                if _truth(v):
                    return v
            return v
        vals = [_eval(a, dot, scope) for a in args]
        if name == "eq":
            return any(vals[0] == v for v in vals[1:])
        if name == "ne":
            return vals[0] != vals[1]
        if name == "not":
            return not _truth(vals[0])
        if name == "len":
            return len(vals[0])
        if name == "index":
            v = vals[0]
            for k in vals[1:]:
                v = v[k]
            return v
        raise TemplateError(f"function {name!r} is not supported by this renderer")
    kind, text = expr
    if kind == "string":
        return bytes(text[1:-1], "utf-8").decode("unicode_escape")
    if kind == "word":
        if text in ("true", "false"):
            return text == "true"
        if text == "nil":
            return None
        return int(text)
    if kind == "field":
        v = dot
        for part in text.split(".")[1:]:
            if part:
                v = _field(v, part)
        return v
    if kind == "var":
        name, *parts = text.split(".")
        v = scope.get(name)
        for part in parts:
            v = _field(v, part)
        return v
    raise TemplateError(f"cannot evaluate {text!r}")


def _print(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "<no value>" if v is None else str(v)


def _run(nodes: list[_Node], dot: Any, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.value)
        elif node.kind == "expr":
            out.append(_print(_eval(node.value, dot, scope)))
        elif node.kind == "declare":
            scope.frames[-1][node.value[0]] = _eval(node.value[1], dot, scope)
        elif node.kind == "assign":
            scope.set(node.value[0], _eval(node.value[1], dot, scope))
        elif node.kind == "if":
            for cond, body in node.branches:
                if cond is None or _truth(_eval(cond, dot, scope)):
                    scope.frames.append({})
                    _run(body, dot, scope, out)
                    scope.frames.pop()
                    break
        elif node.kind == "range":
            names, expr = node.value
            for i, item in enumerate(_eval(expr, dot, scope) or []):
                frame: dict[str, Any] = {}
                if len(names) == 1:
                    frame[names[0]] = item
                elif len(names) == 2:
                    frame[names[0]], frame[names[1]] = i, item
                scope.frames.append(frame)
                _run(node.body, item, scope, out)
                scope.frames.pop()


def render(src: str, data: dict[str, Any]) -> str:
    """Render Go text/template `src` with `data` as dot (dict keys are the fields)."""
    out: list[str] = []
    _run(parse(src), data, _Scope(data), out)
    return "".join(out)
