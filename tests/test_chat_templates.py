"""`data.chat_template`: the built-in templates render as their families do, a Jinja file is read and its
sha256 recorded, and the choice reaches every stage: data check, the adapter's saved tokenizer, the eval
prompts, the merged export, the GGUF and the Modelfile."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil

import pytest

from ft.data import chat_templates
from ft.errors import FtError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]
CHATML_TEXT = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
)
EXPECTED = {
    "chatml": CHATML_TEXT,
    "qwen2.5": CHATML_TEXT,
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "gemma": (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    ),
}
# The family's beginning-of-text token, which its template writes itself via `bos_token`.
BOS = {"llama3": "<|begin_of_text|>", "gemma": "<bos>"}

# A ChatML variant of the user's own: its rendering shows where it was used ("user (ft)").
FILE_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + ' (ft)\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant (ft)\\n' }}{%- endif %}\n"
)


def family_tokenizer(tiny_model_dir, name):
    """The tiny tokenizer with the family's turn markers added as special tokens (a fresh copy)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    builtin = chat_templates.BUILTINS[name]
    extra = [m for m in (*builtin.markers, BOS.get(name)) if m and m not in tok.get_vocab()]
    tok.add_special_tokens({"additional_special_tokens": extra})
    if name in BOS:
        tok.bos_token = BOS[name]
    return tok


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_named_template_renders_a_multi_turn_conversation_as_its_family(tiny_model_dir, name):
    tok = family_tokenizer(tiny_model_dir, name)
    chosen = chat_templates.apply(tok, name, model="tiny")
    assert chosen.source == "named" and tok.chat_template == chat_templates.BUILTINS[name].template
    text = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text == EXPECTED[name]
    # Generation stops where the family's turn ends.
    assert tok.eos_token == chat_templates.BUILTINS[name].end_of_turn


def test_qwen_template_keeps_its_default_system_prompt_and_tool_calls(tiny_model_dir):
    tok = family_tokenizer(tiny_model_dir, "qwen2.5")
    chat_templates.apply(tok, "qwen2.5", model="tiny")
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "12 C"},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    plain = tok.apply_chat_template(messages[:1], tokenize=False)
    assert plain.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    assert "<tools>\n" + json.dumps(tools[0]) in text
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>' in text
    )
    assert "<|im_start|>user\n<tool_response>\n12 C\n</tool_response><|im_end|>\n" in text


def test_a_named_template_whose_markers_are_not_tokens_is_refused(tiny_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path)
    with pytest.raises(FtError) as info:
        chat_templates.apply(tok, "gemma", model="tiny")
    msg = str(info.value)
    assert msg.startswith("data.chat_template: gemma") and "<start_of_turn>, <end_of_turn>" in msg
    assert chat_templates.missing_markers(tok, ("<|im_start|>", "<|im_end|>")) == []


def test_unknown_name_lists_the_builtin_names(tiny_settings):
    with pytest.raises(FtError) as info:
        tiny_settings(**{"data.chat_template": "llama-3"})
    msg = str(info.value)
    assert msg.startswith("--set: data.chat_template: 'llama-3' is not a built-in chat template")
    assert "(chatml, gemma, llama3, qwen2.5)" in msg and "did you mean 'llama3'?" in msg
    with pytest.raises(FtError, match=r"data.chat_template: .*chatml, gemma, llama3, qwen2.5"):
        chat_templates.resolve("vicuna")


def test_missing_or_broken_template_file_is_named(tmp_path, monkeypatch, tiny_settings):
    from ft.pipeline import check_data

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FtError, match=r"^data.chat_template: templates/mine.jinja: no such file$"):
        check_data(tiny_settings(**{"data.chat_template": "templates/mine.jinja"}))
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}\n{{ m.content }\n", encoding="utf-8")
    with pytest.raises(FtError, match=r"^data.chat_template: bad.jinja:2: invalid Jinja: "):
        chat_templates.resolve("bad.jinja")
    (tmp_path / "empty.jinja").write_text(" \n", encoding="utf-8")
    with pytest.raises(FtError, match="empty.jinja: the file is empty"):
        chat_templates.resolve("empty.jinja")


def test_model_without_template_needs_the_setting(tmp_path, monkeypatch, tiny_model_dir, tiny_settings):
    """No template of its own and no data.chat_template: one error at data-check time naming the setting."""
    from ft.pipeline import check_data

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chat_template.jinja").unlink()
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FtError) as info:
        check_data(tiny_settings(**{"model.name_or_path": str(bare)}))
    msg = str(info.value)
    assert "has no chat template of its own; set data.chat_template to a built-in template" in msg
    assert "(chatml, gemma, llama3, qwen2.5)" in msg
    prep = check_data(tiny_settings(**{"model.name_or_path": str(bare), "data.chat_template": "chatml"}))
    template = prep.check.report["tokenizer"]["chat_template"]
    assert template["source"] == "named" and template["name"] == "chatml"
    assert template["sha256"] == hashlib.sha256(chat_templates.CHATML.encode()).hexdigest()


def test_default_is_the_tokenizers_own_and_recorded_so(tiny_settings, tiny_model_dir):
    from ft.pipeline import check_data

    prep = check_data(tiny_settings())
    template = prep.check.report["tokenizer"]["chat_template"]
    own = (tiny_model_dir / "chat_template.jinja").read_text()
    assert template == {
        "source": "tokenizer",
        "name": None,
        "sha256": hashlib.sha256(own.encode()).hexdigest(),
        "eos_token": "<|im_end|>",
    }


def test_reproduce_reads_a_moved_template_file_from_the_bundles_adapter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.jinja").write_text(FILE_TEMPLATE)
    digest = chat_templates.sha256(FILE_TEMPLATE)
    bundle, work = tmp_path / "bundle", tmp_path / "work"
    (bundle / "adapter").mkdir(parents=True)
    work.mkdir()
    assert chat_templates.sealed_file("mine.jinja", digest, bundle, work) == "mine.jinja"
    assert chat_templates.sealed_file("chatml", digest, bundle, work) is None
    (tmp_path / "mine.jinja").write_text(FILE_TEMPLATE + "changed")
    with pytest.raises(FtError, match="mine.jinja: the file is missing or changed"):
        chat_templates.sealed_file("mine.jinja", digest, bundle, work)
    (bundle / "adapter" / "chat_template.jinja").write_text(FILE_TEMPLATE)
    copy = chat_templates.sealed_file("mine.jinja", digest, bundle, work)
    assert copy == str(work / "chat_template.jinja") and chat_templates.resolve(copy).text == FILE_TEMPLATE


@pytest.fixture(scope="module")
def file_run(tmp_path_factory, ft_cache):
    """A tiny `ft run` (2 steps) with a Jinja file as data.chat_template, then `ft export --to merged`."""
    from ft.cli import main

    work = tmp_path_factory.mktemp("chat_template")
    (work / "templates").mkdir()
    (work / "templates" / "mine.jinja").write_text(FILE_TEMPLATE, encoding="utf-8")
    sets = [
        "output.run_name=ct",
        "data.chat_template=templates/mine.jinja",
        "train.max_steps=2",
        "eval.max_examples=2",
        "eval.max_new_tokens=2",
    ]
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as console:
            main(["run", "--recipe", "tiny", *(f"--set={kv}" for kv in sets)])
            run = work / "runs" / "ct"
            assert (run / "adapter" / "adapter_config.json").is_file(), console.getvalue()
            status = main(["export", str(run), "--to", "merged", "--force"])
    finally:
        os.chdir(cwd)
    return {"work": work, "run": run, "export": work / "runs" / "exports" / "ct", "status": status}


def test_file_template_reaches_check_adapter_eval_and_exports(file_run):
    from transformers import AutoTokenizer

    from ft.export import modelfile

    run, export = file_run["run"], file_run["export"]
    digest = hashlib.sha256(FILE_TEMPLATE.encode()).hexdigest()
    # The data check rendered with it and recorded where it came from.
    template = json.loads((run / "data.json").read_text())["tokenizer"]["chat_template"]
    assert template == {
        "source": "file",
        "name": "templates/mine.jinja",
        "sha256": digest,
        "eos_token": "<|im_end|>",
    }
    # The adapter's saved tokenizer carries it.
    assert (run / "adapter" / "chat_template.jinja").read_text() == FILE_TEMPLATE
    # The eval prompts were rendered with it.
    prompts = [json.loads(line)["prompt"] for line in (run / "eval" / "predictions.jsonl").open()]
    assert prompts and all("<|im_start|>user (ft)\n" in p and p.endswith("assistant (ft)\n") for p in prompts)
    # The merged export's tokenizer carries it, and so the Modelfile `ft export` builds from that tokenizer.
    assert file_run["status"] in (0, 1)  # 1: an export metric breach on a 2-step adapter, still sealed
    merged = export / "export" / "merged"
    assert (merged / "chat_template.jinja").read_text() == FILE_TEMPLATE
    text, _ = modelfile.build(AutoTokenizer.from_pretrained(merged), "model-f16.gguf", system=None)
    assert "<|im_start|>user (ft)\n" in text and "<|im_start|>assistant (ft)\n" in text


@pytest.mark.slow
def test_file_template_is_embedded_in_the_gguf_and_the_modelfile(file_run):
    from test_export import _converter_ready

    from ft.cli import main

    if not _converter_ready():
        pytest.skip("llama-cpp-python or its converter is not installed")
    out = file_run["work"] / "gguf-exports"
    with contextlib.redirect_stdout(io.StringIO()):
        main(["export", str(file_run["run"]), "--to", "ollama", "--quant", "", "--force", "--out", str(out)])
    export = out / "ct" / "export"
    rows = json.loads((export / "report.json").read_text())["formats_checked"]
    assert [r["chat_template_embedded"] for r in rows if r["format"] == "f16"] == [True]
    modelfile = (export / "gguf" / "Modelfile").read_text()
    assert "<|im_start|>user (ft)\n" in modelfile and "<|im_start|>assistant (ft)\n" in modelfile


def test_a_chosen_template_is_part_of_the_data_digest():
    """Editing a template file in place (same path, same recipe hash) is other training data: a resume
    must not take it for the same run. The tokenizer's own template leaves the digest as it was."""
    from ft.pipeline import data_sha256

    base = {"files": [{"role": "train", "sha256": "a" * 64}], "split": {"eval_ids": ["x:1"]}}

    def with_template(source, sha):
        return {**base, "tokenizer": {"chat_template": {"source": source, "sha256": sha}}}

    assert data_sha256(with_template("tokenizer", "1" * 64)) == data_sha256(base)
    assert data_sha256(with_template("file", "1" * 64)) != data_sha256(base)
    assert data_sha256(with_template("file", "1" * 64)) != data_sha256(with_template("file", "2" * 64))
    assert data_sha256(with_template("named", "1" * 64)) != data_sha256(base)
