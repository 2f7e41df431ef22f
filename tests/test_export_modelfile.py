"""The Modelfile TEMPLATE renders byte for byte what the chat template renders (no Ollama, no downloads)."""

from __future__ import annotations

import pytest

from ft.errors import FtError
from ft.export import gotemplate, modelfile

# Shipped template strings (as published with the models' tokenizer_config.json; tool branches kept).
QWEN25 = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
    'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n        {{- "\\n" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n            {{- tool_call.function.name }}\n'
    '            {{- \'", "arguments": \' }}\n            {{- tool_call.function.arguments | tojson }}\n'
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)

LLAMA31 = (
    "{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n"
    "{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n"
    '{%- if not date_string is defined %}\n    {%- set date_string = "26 Jul 2024" %}\n{%- endif %}\n'
    "{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n"
    "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n{%- else %}\n"
    '    {%- set system_message = "" %}\n{%- endif %}\n\n'
    "{#- System message + builtin tools #}\n"
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    "{%- if builtin_tools is defined or tools is not none %}\n"
    '    {{- "Environment: ipython\\n" }}\n{%- endif %}\n'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    '{{- system_message }}\n{{- "<|eot_id|>" }}\n\n'
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n"
    "        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "        {{- '{\"name\": \"' + message.tool_calls[0].function.name + '\", ' }}\n"
    "        {{- '\"parameters\": ' }}\n        {{- message.tool_calls[0].function.arguments | tojson }}\n"
    '        {{- "}" }}\n        {{- "<|eot_id|>" }}\n'
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    "        {{- message.content | tojson }}\n"
    '        {{- "<|eot_id|>" }}\n    {%- endif %}\n{%- endfor %}\n'
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n"
)

GEMMA3 = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n    {%- set loop_messages = messages -%}\n{%- endif -%}\n'
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n    {%- else -%}\n'
    "        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- endif -%}\n    {{ '<end_of_turn>\\n' }}\n{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\\n'}}\n{%- endif -%}\n"
)


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
