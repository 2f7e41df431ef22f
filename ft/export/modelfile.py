"""An Ollama Modelfile whose TEMPLATE renders exactly what the tokenizer's chat template renders.

The chat template (Jinja) is probed with sentinel messages through `apply_chat_template`; the text
around the sentinels gives each role's prefix and suffix, the preamble (BOS, a default system block),
the generation prompt, and whether the system message is a block of its own (ChatML, Llama 3) or is
folded into the first user turn (Gemma). From those pieces a Go text/template is written and then
rendered (ft.export.gotemplate) on test conversations and compared byte for byte with the chat
template; a template that cannot be expressed this way is refused rather than written wrong.

Ollama's runner adds the BOS token itself when the model asks for one, so a leading BOS is left out of
the TEMPLATE (`bos_added_by_runtime`) and prepended again when comparing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ft.errors import FtError
from ft.export import gotemplate

Render = Callable[[list[dict[str, str]], bool], str]

_S, _U1, _A1, _U2 = "SYSq7x", "USRq7x1", "ASTq7x1", "USRq7x2"


@dataclass
class ChatPieces:
    preamble: str  # before the first message when there is no system message (BOS removed)
    preamble_sys: str  # before the system message's block (block mode) or before the first user block
    system_prefix: str
    system_suffix: str
    system_folded: bool  # Gemma: the system text goes inside the first user turn
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation_prompt: str
    bos: str  # stripped from the front of every rendering; the runtime adds it


def _after(text: str, marker: str) -> str:
    return text[text.index(marker) + len(marker) :]


def _cut_prefix(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise FtError(f"chat template: cannot isolate {what} (the template is not message-by-message)")
    return text[len(prefix) :]


def _cut_suffix(text: str, suffix: str, what: str) -> str:
    if suffix and not text.endswith(suffix):
        raise FtError(f"chat template: cannot isolate {what} (the template is not message-by-message)")
    return text[: len(text) - len(suffix)]


def derive(render: Render, bos: str = "") -> ChatPieces:
    """Split the chat template into per-role pieces by rendering sentinel conversations."""

    def r(msgs: list[tuple[str, str]], gen: bool) -> str:
        text = render([{"role": role, "content": c} for role, c in msgs], gen)
        return text[len(bos) :] if bos and text.startswith(bos) else text

    try:
        r_u, r_ug = r([("user", _U1)], False), r([("user", _U1)], True)
        r_ua = r([("user", _U1), ("assistant", _A1)], False)
        r_uau = r([("user", _U1), ("assistant", _A1), ("user", _U2)], False)
        r_su = r([("system", _S), ("user", _U1)], False)
    except Exception as exc:  # a template may raise_exception() on shapes it rejects
        raise FtError(f"chat template: rendering a plain conversation failed ({exc})") from None
    user_suffix = _after(r_u, _U1)
    assistant_suffix = _after(r_ua, _A1)
    assistant_prefix = _cut_prefix(
        _after(r_ua, _U1)[: -len(assistant_suffix) - len(_A1)], user_suffix, "user end"
    )
    user_prefix = _cut_prefix(
        _after(r_uau, _A1)[: -len(user_suffix) - len(_U2)], assistant_suffix, "turn start"
    )
    preamble = _cut_suffix(r_u[: r_u.index(_U1)], user_prefix, "the preamble")
    generation_prompt = _cut_prefix(r_ug, r_u, "the generation prompt")
    if _S not in r_su:
        raise FtError("chat template: the system message does not appear in the rendered prompt")
    head = r_su[: r_su.index(_U1)]
    if r_su.index(_S) < len(head) and head.endswith(user_prefix) and _S in _cut_suffix(head, user_prefix, ""):
        sys_block = _cut_suffix(head, user_prefix, "the system block")
        before, after = sys_block.split(_S, 1)
        folded, preamble_sys, system_prefix, system_suffix = False, "", before, after
    else:
        # Folded: preamble + user_prefix + <prefix> S <suffix> + U1
        if not head.startswith(preamble + user_prefix):
            raise FtError("chat template: the system message is neither its own block nor in the first turn")
        fold = head[len(preamble + user_prefix) :]
        if not fold.startswith(_S):
            raise FtError("chat template: cannot place the system message in the first user turn")
        folded, preamble_sys, system_prefix, system_suffix = True, preamble, "", fold[len(_S) :]
    return ChatPieces(
        preamble=preamble,
        preamble_sys=preamble_sys,
        system_prefix=system_prefix,
        system_suffix=system_suffix,
        system_folded=folded,
        user_prefix=user_prefix,
        user_suffix=user_suffix,
        assistant_prefix=assistant_prefix,
        assistant_suffix=assistant_suffix,
        generation_prompt=generation_prompt,
        bos=bos,
    )


def go_template(p: ChatPieces) -> str:
    """The Go text/template for Ollama (`.Messages` with `.Role`/`.Content`); no whitespace trimming."""
    gen = (
        f'{{{{ if ne $last "assistant" }}}}{p.generation_prompt}{{{{ end }}}}' if p.generation_prompt else ""
    )
    user = f"{p.user_prefix}{{{{ .Content }}}}{p.user_suffix}"
    asst = f"{p.assistant_prefix}{{{{ .Content }}}}{p.assistant_suffix}"
    if p.system_folded:
        user = (
            f"{p.user_prefix}{{{{ if and $first $sys }}}}{{{{ $sys }}}}{p.system_suffix}{{{{ end }}}}"
            f"{{{{ $first = false }}}}{{{{ .Content }}}}{p.user_suffix}"
        )
        text = (
            '{{ $sys := "" }}{{ range .Messages }}{{ if eq .Role "system" }}{{ $sys = .Content }}{{ end }}{{ end }}'
            f"{p.preamble}"
            '{{ $first := true }}{{ $last := "" }}{{ range .Messages }}'
            f'{{{{ if eq .Role "user" }}}}{{{{ $last = .Role }}}}{user}'
            f'{{{{ else if eq .Role "assistant" }}}}{{{{ $last = .Role }}}}{asst}{{{{ end }}}}'
            "{{ end }}" + gen
        )
    else:
        system = f"{p.system_prefix}{{{{ .Content }}}}{p.system_suffix}"
        text = (
            f'{{{{ $head := index .Messages 0 }}}}{{{{ if ne $head.Role "system" }}}}{p.preamble}{{{{ end }}}}'
            '{{ $last := "" }}{{ range .Messages }}{{ $last = .Role }}'
            f'{{{{ if eq .Role "system" }}}}{system}'
            f'{{{{ else if eq .Role "user" }}}}{user}'
            f'{{{{ else if eq .Role "assistant" }}}}{asst}{{{{ end }}}}'
            "{{ end }}" + gen
        )
    return text


TEST_CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi there"}],
    [
        {"role": "user", "content": "From Ana in Oslo: my parcel has not arrived."},
        {"role": "assistant", "content": '{"name": "Ana", "city": "Oslo"}'},
        {"role": "user", "content": "And again, please."},
    ],
    [
        {"role": "system", "content": "Reply with one JSON object."},
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "First answer"},
        {"role": "user", "content": "Second question"},
        {"role": "assistant", "content": "Second answer"},
    ],
]


def render_template(template: str, messages: list[dict[str, str]]) -> str:
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    return gotemplate.render(
        template,
        {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages], "System": system},
    )


def check_template(template: str, render: Render, bos: str = "") -> list[str]:
    """Problems (empty when none): each test conversation rendered both ways, compared byte for byte."""
    problems = []
    for conv in TEST_CONVERSATIONS:
        gen = conv[-1]["role"] != "assistant"
        want = render(conv, gen)
        got = bos + render_template(template, conv)
        if got != want:
            roles = "/".join(m["role"] for m in conv)
            problems.append(f"{roles}: TEMPLATE renders {got!r}, the chat template {want!r}")
    return problems


def _quote(text: str, what: str) -> str:
    if '"""' in text:
        raise FtError(f'Modelfile: the {what} contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def render_modelfile(
    gguf_name: str, template: str, stops: list[str], system: str | None, params: dict[str, str] | None = None
) -> str:
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {_quote(template, 'template')}"]
    if system:
        lines.append(f"SYSTEM {_quote(system, 'system prompt')}")
    for stop in stops:
        lines.append(
            f"PARAMETER stop {_quote(stop, 'stop token')}" if " " in stop else f"PARAMETER stop {stop}"
        )
    for key, value in (params or {}).items():
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"


def tokenizer_render(tokenizer) -> Render:
    def render(messages: list[dict[str, str]], gen: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    return render


def runtime_bos(tokenizer) -> str:
    """The BOS text the runtime prepends by itself (llama.cpp/Ollama add it when the model asks for one)."""
    bos = getattr(tokenizer, "bos_token", None)
    return bos if bos and getattr(tokenizer, "add_bos_token", True) is not False else ""


def stop_tokens(tokenizer, generation_config=None) -> list[str]:
    """End-of-turn tokens: the tokenizer's EOS and every EOS id the generation config names."""
    ids: list[int] = []
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    out: list[str] = []
    for i in ids:
        tok = tokenizer.convert_ids_to_tokens(int(i))
        if tok and tok not in out:
            out.append(tok)
    return out


def build(tokenizer, gguf_name: str, *, system: str | None, generation_config=None) -> tuple[str, ChatPieces]:
    """The Modelfile text for `gguf_name` (beside it), checked against the chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise FtError("Modelfile: the tokenizer has no chat template; set one before exporting for Ollama")
    render = tokenizer_render(tokenizer)
    bos = runtime_bos(tokenizer)
    pieces = derive(render, bos)
    template = go_template(pieces)
    if problems := check_template(template, render, bos):
        raise FtError(f"Modelfile: TEMPLATE does not match the chat template: {problems[0]}")
    stops = stop_tokens(tokenizer, generation_config)
    return render_modelfile(gguf_name, template, stops, system), pieces
