"""The Modelfile TEMPLATE renders byte for byte what the chat template renders (no Ollama, no downloads)."""

from __future__ import annotations

import pytest

from ft.data.chat_templates import GEMMA3, LLAMA31, QWEN25  # as the families ship them
from ft.errors import FtError
from ft.export import gotemplate, modelfile


def _jinja_render(template: str, bos: str):
    """apply_chat_template's rendering (transformers' own Jinja environment), without a tokenizer file."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(messages, gen):
        rendered, _ = render_jinja_template(
            conversations=[messages], chat_template=template, add_generation_prompt=gen, bos_token=bos
        )
        return rendered[0]

    return render


@pytest.mark.parametrize(
    "name,template,bos",
    [("qwen2.5", QWEN25, ""), ("llama3.1", LLAMA31, "<|begin_of_text|>"), ("gemma3", GEMMA3, "<bos>")],
)
def test_template_matches_chat_template_byte_for_byte(name, template, bos):
    render = _jinja_render(template, bos)
    pieces = modelfile.derive(render, bos)
    go = modelfile.go_template(pieces)
    assert modelfile.check_template(go, render, bos) == []
    # The conversations the check uses: multi-turn, with and without a system message.
    shapes = {tuple(m["role"] for m in c) for c in modelfile.TEST_CONVERSATIONS}
    assert ("user",) in shapes and ("system", "user", "assistant", "user", "assistant") in shapes
    assert pieces.system_folded is (name == "gemma3")


def test_qwen_default_system_only_without_a_system_message():
    render = _jinja_render(QWEN25, "")
    go = modelfile.go_template(modelfile.derive(render))
    no_sys = modelfile.render_template(go, [{"role": "user", "content": "x"}])
    with_sys = modelfile.render_template(
        go, [{"role": "system", "content": "S"}, {"role": "user", "content": "x"}]
    )
    assert no_sys.startswith("<|im_start|>system\nYou are Qwen")
    assert with_sys.startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nx")
    assert "You are Qwen" not in with_sys


def test_tiny_tokenizer_modelfile(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text, _ = modelfile.build(tok, "model-q8_0.gguf", system="Be terse.")
    assert text.startswith('FROM ./model-q8_0.gguf\nTEMPLATE """')
    assert "PARAMETER stop <|im_end|>\n" in text
    assert 'SYSTEM """Be terse."""' in text


def test_template_that_is_not_message_by_message_is_refused():
    def render(messages, gen):  # reverses the conversation: no fixed per-role pieces exist
        return "".join(f"[{m['role']}]{m['content']}" for m in reversed(messages))

    with pytest.raises(FtError, match="chat template"):
        modelfile.derive(render)


def test_gotemplate_subset():
    src = (
        '{{- $n := 0 }}{{ range $i, $m := .Messages }}{{ $n = $i }}{{ if eq $m.Role "user" }}U:{{ .Content }}'
        '{{ else if ne .Role "system" }}A:{{ .Content }}{{ else }}S{{ end }}\n{{- end }} n={{ $n }} '
        "{{ if and .System (not false) }}sys={{ $.System }}{{ end }}{{ len .Messages }} {{ $h := index .Messages 0 }}{{ $h.Role }}"
    )
    data = {
        "System": "s",
        "Messages": [
            {"Role": "system", "Content": "c0"},
            {"Role": "user", "Content": "c1"},
            {"Role": "x", "Content": "c2"},
        ],
    }
    assert gotemplate.render(src, data) == "SU:c1A:c2 n=2 sys=s3 system"
    with pytest.raises(gotemplate.TemplateError):
        gotemplate.render("{{ with .X }}{{ end }}", {})
    with pytest.raises(gotemplate.TemplateError):
        gotemplate.render("{{ if true }}", {})
    with pytest.raises(gotemplate.TemplateError):
        gotemplate.render("{{ (index .M 0).Role }}", {"M": [{"Role": "x"}]})
