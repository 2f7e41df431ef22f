"""Hub datasets as data (`hf:org/name`), read offline from a `datasets` cache built on the spot, and
`data.columns` for rows whose columns have other names."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from ft.cli import main
from ft.config import load_settings
from ft.data import DataError, check, render_report
from ft.data.hub import HubSpec, parse
from ft.errors import FtError
from ft.pipeline import data_sha256
from ft.testing import ticket_rows, write_cached_hub_dataset, write_jsonl

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def rows(n: int, tag: str = "") -> list[dict]:
    return [chat(f"question {i}{tag}", f"answer {i}") for i in range(n)]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """hub(repo, {split: rows}, commit=..., config=...) caches a dataset where `datasets` reads it offline."""
    import datasets
    from huggingface_hub import constants

    assert datasets.config.HF_HUB_OFFLINE  # conftest turns offline mode on before `datasets` is imported
    cache = tmp_path / "hf" / "datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)

    def publish(repo: str, splits: dict[str, list[dict]], commit: str = COMMIT_A, config: str = "default"):
        return write_cached_hub_dataset(cache, repo, splits, commit, config)

    return publish


def hub_check(tiny_settings, tiny_tokenizer, *train: str, **overrides):
    return check(tiny_settings(**{"data.train": list(train), **overrides}), tokenizer=tiny_tokenizer)


# -- notation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given", "repo", "revision", "config", "split"),
    [
        ("hf:org/name", "org/name", None, None, "train"),
        ("hf:org/name:test", "org/name", None, None, "test"),
        ("hf:org/name:small:validation", "org/name", None, "small", "validation"),
        (f"hf:org/name@{COMMIT_A}:default:train", "org/name", COMMIT_A, "default", "train"),
        ("hf:squad@v1.0", "squad", "v1.0", None, "train"),
    ],
)
def test_notation(given, repo, revision, config, split):
    assert parse(given) == HubSpec(given, repo, revision, config, split)


@pytest.mark.parametrize(
    "given", ["hf:", "hf:org/name/extra", "hf:org/name@", "hf:org/name:a:b:c", "hf:org/x::t"]
)
def test_bad_notation_is_one_line_naming_the_entry(given):
    with pytest.raises(FtError, match=r"not a Hub dataset name \(write hf:ORG/NAME"):
        parse(given)


# -- reading -------------------------------------------------------------------------------------------
def test_hub_split_checks_and_its_revision_and_fingerprint_land_in_the_report(
    hub, tiny_settings, tiny_tokenizer
):
    hub("org/chat", {"train": rows(30)})
    result = hub_check(tiny_settings, tiny_tokenizer, "hf:org/chat")
    assert len(result.train) + len(result.eval) == 30
    assert result.train[0].id.startswith("hf:org/chat[train]:#")
    (entry,) = result.report["files"]
    assert entry["name"] == "hf:org/chat" and entry["rows"] == 30 and entry["format"] == "hf"
    assert entry["source"] == "huggingface-hub" and entry["dataset"] == "org/chat"
    assert entry["split"] == "train" and entry["revision"] == COMMIT_A and entry["fingerprint"]
    # sha256 and size are those of the rows written as canonical JSON Lines: recomputable without ft.
    lines = [json.dumps(r, sort_keys=True, separators=(",", ":")).encode() + b"\n" for r in rows(30)]
    assert entry["sha256"] == hashlib.sha256(b"".join(lines)).hexdigest()
    assert entry["bytes"] == sum(map(len, lines))
    text = render_report(result.report)
    assert f"Hub split train, revision {COMMIT_A[:12]}, fingerprint {entry['fingerprint']}" in text


def test_config_split_and_pinned_revision_choose_the_rows(hub, tiny_settings, tiny_tokenizer):
    hub("org/multi", {"train": rows(20), "test": rows(6, " (test)")}, config="small")
    result = hub_check(
        tiny_settings,
        tiny_tokenizer,
        "hf:org/multi:small:train",
        **{"data.eval": [f"hf:org/multi@{COMMIT_A}:small:test"]},
    )
    assert len(result.eval) == 6 and all("(test)" in ex.messages[0]["content"] for ex in result.eval)
    assert result.eval[0].id == f"hf:org/multi@{COMMIT_A}:small[test]:#0"
    with pytest.raises(DataError, match=r"hf:org/multi:small:nope: no split 'nope'"):
        hub_check(tiny_settings, tiny_tokenizer, "hf:org/multi:small:nope")


def test_a_bad_row_names_dataset_split_index_and_field(hub, tiny_settings, tiny_tokenizer):
    data = rows(10)
    data[7] = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}
    hub("org/bad", {"train": data})
    with pytest.raises(DataError) as info:
        hub_check(tiny_settings, tiny_tokenizer, "hf:org/bad")
    assert str(info.value).startswith("hf:org/bad[train]:#7: messages[1].role: 'bot' is not one of")


def test_missing_fields_in_arrow_rows_are_absent_not_null(hub, tiny_settings, tiny_tokenizer):
    """Arrow gives every row every column: an Alpaca row without `input` or `system` reads as null there."""
    alpaca = [{"instruction": f"do {i}", "output": f"done {i}"} for i in range(8)]
    alpaca[0] |= {"input": "extra", "system": "Be brief.", "history": [["hello", "hi there"]]}
    hub("org/alpaca", {"train": alpaca})
    result = hub_check(tiny_settings, tiny_tokenizer, "hf:org/alpaca", **{"data.eval_fraction": 0.2})
    first = next(ex for ex in result.train + result.eval if ex.line == "#0")
    assert [m["role"] for m in first.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert first.messages[3]["content"] == "do 0\n\nextra"


def test_tool_calling_rows_from_the_hub_keep_their_calls(hub, tiny_settings):
    """Arrow fills absent struct fields with null (a user turn's tool_calls, a tool's unused argument):
    the rows reach the check as the JSON would have had them, and the calls reach the training text."""
    from ft.data.encode import render_chats
    from ft.modelref import recipe_tokenizer

    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    data = [
        {
            "tools": [weather],
            "messages": [
                {"role": "user", "content": f"Weather in Oslo, day {i}?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "name": "get_weather", "content": f"{i} C"},
                {"role": "assistant", "content": f"It is {i} C."},
            ],
        }
        for i in range(6)
    ] + rows(6)
    hub("org/tools", {"train": data})
    overrides = {"data.chat_template": "qwen2.5", "train.max_seq_length": 1024}  # Qwen's tool preamble
    settings = tiny_settings(**{"data.train": ["hf:org/tools"], **overrides})
    tokenizer = recipe_tokenizer(settings)
    result = check(settings, tokenizer=tokenizer)
    assert result.report["tools"]["rows_with_tool_calls"] == 6
    ex = next(ex for ex in result.train + result.eval if ex.tools)
    assert ex.messages[1]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": {"city": "Oslo"},
    }
    assert "tool_calls" not in ex.messages[0]
    (text,) = render_chats(tokenizer, [ex.messages], tools=[ex.tools])
    assert '{"name": "get_weather", "arguments": {"city": "Oslo"}}' in text and '"get_weather"' in text


def test_the_data_digest_follows_the_dataset(hub, tiny_settings, tiny_tokenizer):
    hub("org/moving", {"train": rows(20)}, commit=COMMIT_A)
    before = hub_check(tiny_settings, tiny_tokenizer, "hf:org/moving").report
    changed = rows(20)
    changed[3] = chat("question 3", "a better answer")
    os.utime(hub("org/moving", {"train": changed}, commit=COMMIT_B), (2e9, 2e9))  # the newest copy
    after = hub_check(tiny_settings, tiny_tokenizer, "hf:org/moving").report
    assert after["files"][0]["revision"] == COMMIT_B
    assert after["files"][0]["sha256"] != before["files"][0]["sha256"]
    assert data_sha256(after) != data_sha256(before)
    # Offline, `datasets` reads the newest cached commit whatever revision is asked: ft refuses it.
    with pytest.raises(DataError, match=f"the cache holds commit {COMMIT_B[:12]}, not revision {COMMIT_A}"):
        hub_check(tiny_settings, tiny_tokenizer, f"hf:org/moving@{COMMIT_A}")
    with pytest.raises(DataError, match="offline, the cache cannot tell which commit 'v2' is"):
        hub_check(tiny_settings, tiny_tokenizer, "hf:org/moving@v2")


def test_a_branch_is_resolved_through_the_hub_cache_refs(hub, tiny_settings, tiny_tokenizer, tmp_path):
    hub("org/tagged", {"train": rows(12)}, commit=COMMIT_A)
    refs = tmp_path / "hf" / "hub" / "datasets--org--tagged" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(COMMIT_A)
    result = hub_check(tiny_settings, tiny_tokenizer, "hf:org/tagged@main")
    assert result.report["files"][0]["revision"] == COMMIT_A
    short = hub_check(tiny_settings, tiny_tokenizer, f"hf:org/tagged@{COMMIT_A[:7]}")  # a commit's prefix
    assert short.report["files"][0]["revision"] == COMMIT_A


def test_offline_and_not_cached_is_one_line_and_exit_2(hub, capsys):
    assert main(["data", "check", "--recipe", "tiny", "--train", "hf:org/missing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(
        "error: hf:org/missing: not in the Hugging Face datasets cache, and offline mode"
    )


# -- data.columns --------------------------------------------------------------------------------------
def test_columns_map_hub_rows_and_errors_name_the_users_column(hub, tiny_settings, tiny_tokenizer):
    renamed = [{"id": i, "conversation": r["messages"]} for i, r in enumerate(rows(10))]
    hub("org/renamed", {"train": renamed})
    mapping = {"data.columns": {"messages": "conversation"}}
    result = hub_check(tiny_settings, tiny_tokenizer, "hf:org/renamed", **mapping)
    assert result.report["shapes"] == {"messages": 10}
    renamed[4]["conversation"][1]["role"] = "bot"
    hub("org/renamed-bad", {"train": renamed})
    with pytest.raises(DataError, match=r"hf:org/renamed-bad\[train\]:#4: conversation\[1\]\.role: 'bot'"):
        hub_check(tiny_settings, tiny_tokenizer, "hf:org/renamed-bad", **mapping)


def test_columns_map_file_rows(tmp_path, monkeypatch, tiny_settings, tiny_tokenizer):
    monkeypatch.chdir(tmp_path)
    data = [{"question": f"q {i}", "response": f"r {i}", "instruction": "ignored"} for i in range(10)]
    write_jsonl(tmp_path / "lf.jsonl", data)
    columns = {"instruction": "question", "output": "response"}
    result = check(
        tiny_settings(**{"data.train": ["lf.jsonl"], "data.columns": columns}), tokenizer=tiny_tokenizer
    )
    first = next(ex for ex in result.train + result.eval if ex.line == 1)
    assert first.messages == [{"role": "user", "content": "q 0"}, {"role": "assistant", "content": "r 0"}]
    write_jsonl(tmp_path / "lf.jsonl", [*data[:2], {"question": "q", "response": 5}])
    with pytest.raises(DataError, match=r"lf\.jsonl:3: response: expected a string, got number"):
        check(
            tiny_settings(**{"data.train": ["lf.jsonl"], "data.columns": columns}), tokenizer=tiny_tokenizer
        )


def test_unknown_column_fields_are_refused_with_the_valid_names():
    with pytest.raises(FtError) as info:
        load_settings("tiny", {"data": {"columns": {"msgs": "conversation"}}})
    text = str(info.value)
    assert "data.columns" in text and "unknown field(s) msgs" in text
    assert "messages, conversations, instruction, input, output, system, history" in text
    with pytest.raises(FtError, match="column 'a' is given for both prompt and text"):
        load_settings("tiny", {"data": {"columns": {"prompt": "a", "text": "a"}}})


# -- a whole run ---------------------------------------------------------------------------------------
def test_a_tiny_run_trains_from_a_cached_hub_dataset(hub, tmp_path):
    hub("org/tickets", {"train": ticket_rows(40)})
    args = ["run", "--recipe", "tiny", "--train", "hf:org/tickets", "--no-package"]
    overrides = ["train.max_steps=2", "eval.max_examples=2", "output.run_name=hub"]
    assert main([*args, *(x for o in overrides for x in ("--set", o))]) == 0
    (run_dir,) = [p for p in Path("runs").iterdir() if p.is_dir()]
    data = json.loads((run_dir / "data.json").read_text())
    assert data["files"][0]["revision"] == COMMIT_A and data["files"][0]["dataset"] == "org/tickets"
    assert json.loads((run_dir / "run.json").read_text())["data_sha256"] == data["data_sha256"]

    # Sealed with its rows: the Hub split goes into the bundle as the canonical JSON Lines its sha256
    # covers, and a rerun reads the bundled copy (or, without it, the split at the recorded commit).
    assert main(["package", str(run_dir), "--include-data", "--out", "bundles"]) == 0
    (bundle,) = [p for p in Path("bundles").iterdir() if p.is_dir()]
    from ft.bundle.reproduce import _same_rows, _sealed_data_paths
    from ft.fsutil import sha256_file

    rows_file = bundle / "data" / "org--tickets-train.jsonl"
    assert sha256_file(rows_file) == data["files"][0]["sha256"]
    assert _sealed_data_paths(bundle, data) == {"hf:org/tickets": str(rows_file)}
    assert _sealed_data_paths(run_dir, data) == {"hf:org/tickets": f"hf:org/tickets@{COMMIT_A}:train"}
    _same_rows(data, data)
    with pytest.raises(FtError, match="differ from the sealed data"):
        _same_rows(data, {"files": [{**data["files"][0], "sha256": "0" * 64}]})
