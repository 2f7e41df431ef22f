r"""Which chat template renders the rows: `data.chat_template`.

    null / "tokenizer"   the model tokenizer's own (the default)
    "chatml", "llama3", "qwen2.5", "gemma"
                         a template shipped here, exactly as the model family ships it
    a path               a Jinja file (`builtin:NAME` = shipped with ft), read as UTF-8 text

`apply` sets the choice on a loaded tokenizer; `ft.modelref.recipe_tokenizer` calls it for every stage
(data check, training, eval, export), so the template rows were measured with is the one the adapter
is trained, evaluated and saved with. The template's source and sha256 go into data.json.

A built-in template is refused on a tokenizer whose vocabulary lacks its turn markers as single tokens:
`<|im_start|>` split into seven ordinary pieces costs every turn several tokens the model has never
seen together, the LoRA cannot train the embeddings of new tokens, and generation cannot stop at an
end-of-turn that is not a token. Refusing says so before any training time is spent. A built-in
template also makes its end-of-turn marker the tokenizer's EOS (as the instruct models of each family
do), so generation in `ft eval`, the merged model and the Ollama Modelfile stops where a turn ends.
A Jinja file is taken as written: its markers are the user's to match to the vocabulary.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ft.errors import FtError

SETTING = "data.chat_template"
TOKENIZER = "tokenizer"  # the setting's value for "the tokenizer's own" (as is null)
JINJA_SUFFIXES = (".jinja", ".jinja2", ".j2")

# -- the templates, as shipped in each family's tokenizer_config.json / chat_template.jinja ---------------
# ChatML as OpenAI described it and transformers' docs ship it (OpenHermes, Qwen1.5 and others use it).
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2.5 Instruct (all sizes), with its tool-call branches.
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Llama 3.1 Instruct (Llama 3.3 ships the same), with its built-in and custom tool branches.
LLAMA31 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Gemma 3 instruction-tuned (1B to 27B): no system role, the system text opens the first user turn.
GEMMA3 = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


@dataclass(frozen=True)
class Builtin:
    template: str
    markers: tuple[str, ...]  # turn markers every conversation renders; each must be one token
    end_of_turn: str  # becomes the tokenizer's EOS, so generation stops where a turn ends
    family: str


BUILTINS: dict[str, Builtin] = {
    "chatml": Builtin(CHATML, ("<|im_start|>", "<|im_end|>"), "<|im_end|>", "ChatML"),
    "gemma": Builtin(GEMMA3, ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>", "Gemma 3 IT"),
    "llama3": Builtin(
        LLAMA31,
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|eot_id|>",
        "Llama 3.1/3.3 Instruct",
    ),
    "qwen2.5": Builtin(QWEN25, ("<|im_start|>", "<|im_end|>"), "<|im_end|>", "Qwen2.5 Instruct"),
}
NAMES = ", ".join(sorted(BUILTINS))


def sha256(template: Any) -> str | None:
    """sha256 of a template's text (UTF-8); a tokenizer's several named templates hash as one."""
    if not template:
        return None
    return hashlib.sha256(str(template).encode("utf-8")).hexdigest()


# -- the setting ---------------------------------------------------------------------------------------
def is_tokenizer_own(setting: str | None) -> bool:
    return setting is None or setting == TOKENIZER


def looks_like_path(setting: str) -> bool:
    return (
        setting.startswith(("builtin:", "~", "."))
        or "/" in setting
        or "\\" in setting
        or setting.endswith(JINJA_SUFFIXES)
        or Path(setting).is_file()
    )


def check_setting(setting: str | None) -> str | None:
    """Config-time check (no file access beyond `is_file`): a value that is neither the tokenizer's own,
    a built-in name nor a path is an unknown name; ValueError names the built-in templates."""
    if is_tokenizer_own(setting) or setting in BUILTINS:
        return setting
    if not setting.strip():
        raise ValueError(f"empty; use null (the tokenizer's own), a built-in name ({NAMES}) or a Jinja file")
    if looks_like_path(setting):
        return setting
    import difflib

    close = difflib.get_close_matches(setting.lower(), list(BUILTINS), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"{setting!r} is not a built-in chat template ({NAMES}) nor a Jinja file path "
        f"(a path with a / or ending .jinja){hint}"
    )


@dataclass(frozen=True)
class Chosen:
    """A resolved `data.chat_template`: where the template comes from, and its text (None: the tokenizer's)."""

    source: str  # tokenizer | named | file
    name: str | None  # the built-in name, or the path as the recipe gives it
    text: str | None
    path: str | None = None  # the file read, resolved


def resolve(setting: str | None) -> Chosen:
    """The template `setting` names; FtError for an unknown name or an unreadable or invalid file."""
    if is_tokenizer_own(setting):
        return Chosen(TOKENIZER, None, None)
    if setting in BUILTINS:
        return Chosen("named", setting, BUILTINS[setting].template)
    try:
        check_setting(setting)
    except ValueError as exc:
        raise FtError(f"{SETTING}: {exc}") from None
    from ft.config import resolve_path

    path = Path(resolve_path(setting))
    if not path.is_file():
        what = "is a directory, not a Jinja file" if path.is_dir() else "no such file"
        raise FtError(f"{SETTING}: {setting}: {what}")
    try:
        text = path.read_bytes().decode("utf-8")  # bytes: the sha256 is the file's, CRLF and all
    except UnicodeDecodeError:
        raise FtError(f"{SETTING}: {setting}: not UTF-8 text; a chat template is a Jinja text file") from None
    except OSError as exc:
        raise FtError(f"{SETTING}: {setting}: cannot read ({exc.strerror or exc})") from None
    if not text.strip():
        raise FtError(f"{SETTING}: {setting}: the file is empty")
    _compile(text, setting)
    return Chosen("file", setting, text, str(path))


def _compile(text: str, where: str) -> None:
    """Parse the template with transformers' own Jinja environment, so a syntax error names its line."""
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(text)
    except TemplateSyntaxError as exc:
        raise FtError(f"{SETTING}: {where}:{exc.lineno}: invalid Jinja: {exc.message}") from None


# -- applying it to a tokenizer ------------------------------------------------------------------------
_APPLIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> the Chosen applied


def missing_markers(tokenizer: Any, markers: tuple[str, ...]) -> list[str]:
    """Markers that the tokenizer does not encode as exactly one token of its vocabulary."""
    vocab = tokenizer.get_vocab()
    out = []
    for marker in markers:
        ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if marker not in vocab or ids != [vocab[marker]]:
            out.append(marker)
    return out


def apply(tokenizer: Any, setting: Chosen | str | None, *, model: str) -> Chosen:
    """Set `setting`'s template (or an already resolved one) on `tokenizer`, a built-in one only if its
    turn markers are tokens; FtError when the tokenizer is left without any template. `model` names it."""
    chosen = setting if isinstance(setting, Chosen) else resolve(setting)
    if chosen.source == "named":
        builtin = BUILTINS[chosen.name]
        if missing := missing_markers(tokenizer, builtin.markers):
            raise FtError(
                f"{SETTING}: {chosen.name} ({builtin.family}) needs its turn markers as tokens, but "
                f"{model!r} has no single token for {', '.join(missing)}: its turns would train as pieces of "
                "ordinary text and generation could not stop at a turn's end; use the template of the "
                "model's own family, or null for the tokenizer's own"
            )
        tokenizer.eos_token = builtin.end_of_turn
    if chosen.text is not None:
        tokenizer.chat_template = chosen.text
    elif not getattr(tokenizer, "chat_template", None):
        raise FtError(
            f"model.name_or_path: {model!r} has no chat template of its own; set {SETTING} to a built-in "
            f"template ({NAMES}) or a Jinja file, or use an instruct/chat model"
        )
    _APPLIED[tokenizer] = chosen
    return chosen


def facts(tokenizer: Any, setting: str | None = None) -> dict[str, Any]:
    """What data.json records about the template the rows were rendered with."""
    chosen = _APPLIED.get(tokenizer)
    if chosen is None:  # a tokenizer handed in by the caller; the recipe says where its template is from
        chosen = Chosen(TOKENIZER, None, None) if is_tokenizer_own(setting) else _described(setting)
    return {
        "source": chosen.source,
        "name": chosen.name,
        "sha256": sha256(getattr(tokenizer, "chat_template", None)),
        "eos_token": getattr(tokenizer, "eos_token", None),
    }


def _described(setting: str) -> Chosen:
    return Chosen("named" if setting in BUILTINS else "file", setting, None)


# -- a bundle's template, for `ft reproduce` -----------------------------------------------------------
def saved_template(tokenizer_dir: Path) -> str | None:
    """The chat template a tokenizer was saved with (chat_template.jinja, else tokenizer_config.json)."""
    import json

    jinja = tokenizer_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_bytes().decode("utf-8")
    config = tokenizer_dir / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def sealed_file(setting: str | None, sealed_sha256: str | None, bundle_dir: Path, work: Path) -> str | None:
    """The template file a reproduction reads for a file `setting`: the recorded path while its content
    is unchanged, else the bundle's adapter copy (written into `work`). None for other settings."""
    if is_tokenizer_own(setting) or setting in BUILTINS:
        return None
    from ft.config import resolve_path

    try:
        original = Path(resolve_path(setting))
        if original.is_file() and sha256(original.read_bytes().decode("utf-8")) == sealed_sha256:
            return setting
    except (FtError, OSError, UnicodeDecodeError):
        pass
    saved = saved_template(bundle_dir / "adapter")
    if saved is not None and sha256(saved) == sealed_sha256:
        copy = work / "chat_template.jinja"
        copy.write_bytes(saved.encode("utf-8"))
        return str(copy)
    raise FtError(
        f"{SETTING}: {setting}: the file is missing or changed and the bundle's adapter holds no template "
        "with the sealed sha256"
    )
