"""ft.data: shapes, located errors, file quirks, policies, the split, leakage, labels and the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ft.data import DataError, Example, check, render_report
from ft.data.shapes import RowProblem, normalise
from ft.fsutil import sha256_file
from ft.testing import ticket_rows

SYS = {"role": "system", "content": "Be brief."}


def chat(user: str, answer: str, *, system: bool = False) -> dict:
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": ([SYS] if system else []) + turns}


def write(path: Path, rows: list | bytes | str) -> Path:
    if isinstance(rows, bytes):
        path.write_bytes(rows)
    elif isinstance(rows, str):
        path.write_text(rows, encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def run(tmp_path, monkeypatch, tiny_settings, tiny_tokenizer):
    """run({"train.jsonl": rows}, eval={...}, **overrides) -> CheckResult; files are named as given."""
    monkeypatch.chdir(tmp_path)

    def go(train: dict, eval: dict | None = None, **overrides):
        for name, rows in {**train, **(eval or {})}.items():
            write(tmp_path / name, rows)
        settings = tiny_settings(**{"data.train": list(train), "data.eval": list(eval or {}), **overrides})
        return check(settings, tokenizer=tiny_tokenizer)

    return go


def problem(run, train: dict, **kw) -> str:
    with pytest.raises(DataError) as info:
        run(train, **kw)
    return str(info.value)


# -- shapes --------------------------------------------------------------------------------------------
U, A = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}

SHAPE_CASES = {
    "messages": (
        {
            "messages": [
                SYS,
                U,
                {"role": "assistant", "content": "call"},
                {"role": "tool", "content": "42"},
                A,
            ]
        },
        [SYS, U, {"role": "assistant", "content": "call"}, {"role": "tool", "content": "42"}, A],
    ),
    "sharegpt": (
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "hi"},
                {"from": "function_call", "value": "call"},
                {"from": "observation", "value": "42"},
                {"from": "gpt", "value": "yo"},
            ]
        },
        [SYS, U, {"role": "assistant", "content": "call"}, {"role": "tool", "content": "42"}, A],
    ),
    "alpaca": (
        {
            "instruction": "Add",
            "input": "2 and 3",
            "output": "5",
            "system": "Be brief.",
            "history": [["hi", "yo"]],
        },
        [SYS, U, A, {"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}],
    ),
    "alpaca-no-input": (
        {"instruction": "Say yo", "input": "", "output": "yo"},
        [{"role": "user", "content": "Say yo"}, A],
    ),
    "prompt_completion": ({"prompt": "hi", "completion": "yo"}, [U, A]),
    "prompt_completion-lists": ({"prompt": [SYS, U], "completion": [A]}, [SYS, U, A]),
    "text": ({"text": "Once upon a time."}, [{"role": "assistant", "content": "Once upon a time."}]),
}


@pytest.mark.parametrize("case", list(SHAPE_CASES))
def test_every_shape_normalises_to_messages(case):
    row, expected = SHAPE_CASES[case]
    shape, messages, _answer = normalise(row, "auto")
    assert shape == case.split("-")[0]
    assert messages == expected


def test_explicit_format_refuses_other_shapes():
    with pytest.raises(RowProblem) as info:
        normalise({"messages": [U, A]}, "alpaca")
    assert (info.value.field, info.value.problem) == ("instruction", "missing")


def test_mixed_shapes_in_one_file_are_counted(run):
    rows = [row for row, _ in SHAPE_CASES.values()]
    result = run({"mixed.jsonl": rows})
    assert result.report["shapes"] == {
        "messages": 1,
        "sharegpt": 1,
        "alpaca": 2,
        "prompt_completion": 2,
        "text": 1,
    }
    assert result.report["rows"]["read"] == 7


# -- located errors ------------------------------------------------------------------------------------
ERRORS = [
    (
        {"messages": [U, {"role": "bot", "content": "x"}]},
        "rows.jsonl:2: messages[1].role: 'bot' is not one of system, user, assistant, tool",
    ),
    ({"messages": [U, {"content": "x"}]}, "rows.jsonl:2: messages[1].role: missing"),
    ({"messages": [U, {"role": "assistant"}]}, "rows.jsonl:2: messages[1].content: missing"),
    (
        {"messages": [U, {"role": "assistant", "content": "  "}]},
        "rows.jsonl:2: messages[1].content: empty assistant turn",
    ),
    ({"messages": [U, U, A]}, "rows.jsonl:2: messages[1].role: expected assistant after user, got user"),
    (
        {"messages": [U, A, U]},
        "rows.jsonl:2: messages[2].role: the conversation must end with an assistant turn",
    ),
    ({"messages": [U, A, SYS, U, A]}, "rows.jsonl:2: messages[2].role: a system turn is only allowed first"),
    (
        {"messages": [U, {"role": "tool", "content": "1"}, A]},
        "rows.jsonl:2: messages[1].role: a tool turn must follow",
    ),
    ({"messages": [A]}, "rows.jsonl:2: messages[0].role: the conversation must start with a user turn"),
    (
        {"messages": [U, {"role": "assistant", "content": 5}]},
        "rows.jsonl:2: messages[1].content: expected a string, got number",
    ),
    (
        {"messages": [U, None]},
        "rows.jsonl:2: messages[1]: expected an object with role and content, got null",
    ),
    ({"messages": "hi"}, "rows.jsonl:2: messages: expected an array of messages, got string"),
    ({"messages": []}, "rows.jsonl:2: messages: empty conversation"),
    (
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]},
        "rows.jsonl:2: conversations[1].from: 'bot' is not one of system, human, gpt, function_call, observation",
    ),
    (
        {"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]},
        "rows.jsonl:2: conversations[0].value: missing",
    ),
    ({"instruction": "Add 2 and 3"}, "rows.jsonl:2: output: missing"),
    (
        {"instruction": "Add", "output": "5", "history": [["a"]]},
        "rows.jsonl:2: history[0]: expected a [user, assistant] pair",
    ),
    ({"prompt": "hi", "completion": ""}, "rows.jsonl:2: completion: empty assistant turn"),
    ({"prompt": "hi"}, "rows.jsonl:2: completion: missing"),
    ({"text": ""}, "rows.jsonl:2: text: empty text"),
    ({"foo": 1, "bar": 2}, "rows.jsonl:2: not a known row shape"),
    (["not", "an", "object"], "rows.jsonl:2: expected a JSON object, got array"),
]


@pytest.mark.parametrize(("row", "expected"), ERRORS, ids=[e[1].split(": ", 1)[1][:40] for e in ERRORS])
def test_errors_name_file_line_and_field(run, row, expected):
    message = problem(run, {"rows.jsonl": [chat("fine", "ok"), row]})
    assert message.startswith(expected), message
    assert "\n" not in message


def test_json_array_errors_use_the_index(run):
    message = problem(
        run, {"rows.json": json.dumps([chat("a", "b"), {"messages": [U, {"role": "bot", "content": "x"}]}])}
    )
    assert message.startswith("rows.json:[1]: messages[1].role: 'bot' is not one of")


def test_json_array_rows_get_index_ids(run):
    result = run({"rows.json": json.dumps([chat(f"q{i}", "a") for i in range(30)])})
    ids = sorted((ex.id for ex in result.train + result.eval), key=lambda i: int(i.split("[")[1][:-1]))
    assert ids == [f"rows.json:[{i}]" for i in range(30)]
    assert result.report["files"][0]["format"] == "json"


def test_all_problems_are_collected_and_capped(run):
    bad = {"messages": [U, {"role": "bot", "content": "x"}]}
    with pytest.raises(DataError) as info:
        run({"rows.jsonl": [bad] * 80})
    err = info.value
    assert err.total == 80 and len(err.problems) == 50
    assert str(err).endswith("(+79 more)")
    assert err.problems[1].startswith("rows.jsonl:2: ")


# -- file quirks ---------------------------------------------------------------------------------------
GOOD = json.dumps(chat("hello", "world"))
GOOD2 = json.dumps(chat("hello again", "world"))


def test_bom_crlf_and_blank_lines_are_accepted(run):
    data = b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n\r\n   \r\n" + GOOD2.encode() + b"\r\n"
    result = run({"rows.jsonl": data})
    assert sorted(ex.id for ex in result.train + result.eval) == ["rows.jsonl:1", "rows.jsonl:4"]
    assert result.report["files"][0]["bytes"] == len(data)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (
            "rows.jsonl",
            f'{GOOD}\n{{"messages": [}}\n',
            "rows.jsonl:2: invalid JSON: Expecting value (column 15)",
        ),
        (
            "rows.jsonl",
            GOOD.encode() + b"\n" + GOOD[:20].encode() + b"\xff\xfe" + b"\n",
            "rows.jsonl:2: not valid UTF-8 (byte 0xff",
        ),
        (
            "rows.jsonl",
            json.dumps([chat("a", "b")], indent=2),
            "rows.jsonl:1: starts with '[', so it holds a JSON array, not JSON Lines",
        ),
        (
            "rows.json",
            f"{GOOD}\n{GOOD2}\n",
            "rows.json: starts with '{', not '[': a .json file must hold one array",
        ),
        (
            "rows.json",
            "[\n" + GOOD + "\n" + GOOD + "\n]",
            "rows.json:3: invalid JSON: Expecting ',' delimiter (column 1)",
        ),
        ("rows.jsonl", "", "rows.jsonl: no rows (the file is empty)"),
        ("rows.jsonl", "\n  \n", "rows.jsonl: no rows (the file is empty)"),
        ("rows.json", "[]", "rows.json: no rows (the array is empty)"),
        ("rows.jsonl", "[" * 100_000 + "\n", "rows.jsonl:1: starts with '['"),
        ("rows.txt", "[" * 100_000 + "]" * 100_000, "rows.txt: invalid JSON: nested too deeply"),
        (
            "rows.jsonl",
            '{"text": "' + "[" * 10 + '"}\n' + '{"a":' * 100_000 + "1" + "}" * 100_000 + "\n",
            "rows.jsonl:2: invalid JSON: nested too deeply",
        ),
        (
            "rows.jsonl",
            '{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "x"}]}\n',
            "rows.jsonl:1: messages[0].content: contains an unpaired UTF-16 surrogate",
        ),
    ],
    ids=[
        "invalid-json",
        "non-utf8",
        "array-as-jsonl",
        "jsonl-as-json",
        "array-invalid",
        "empty",
        "blank",
        "empty-array",
        "array-bracket-jsonl",
        "deep-array",
        "deep-line",
        "lone-surrogate",
    ],
)
def test_file_problems_are_one_located_line(run, name, content, expected):
    message = problem(run, {name: content})
    assert message.startswith(expected), message


def test_extension_less_files_are_sniffed(run):
    assert len(run({"rows.data": f"{GOOD}\n{GOOD2}\n"}).train) == 1
    assert len(run({"rows.txt": json.dumps([chat("a", "b"), chat("c", "d")])}).train) == 1


def test_missing_file_and_directory(run, tmp_path):
    (tmp_path / "adir").mkdir()
    settings_args = {"data.train": ["nope.jsonl", "adir", "builtin:nope.jsonl"]}
    with pytest.raises(DataError) as info:
        run({}, **settings_args)
    assert info.value.problems[0] == "nope.jsonl: no such file"
    assert info.value.problems[1].startswith("adir: is a directory")
    assert info.value.problems[2].startswith("builtin:nope.jsonl: no such built-in file")


def test_overlong_line_is_refused_without_reading_it(run, tmp_path, tiny_settings, tiny_tokenizer):
    write(tmp_path / "big.jsonl", GOOD + "\n" + '{"text": "' + "x" * 5000 + '"}\n')
    settings = tiny_settings(**{"data.train": ["big.jsonl"]})
    with pytest.raises(DataError) as info:
        check(settings, tokenizer=tiny_tokenizer, max_line_bytes=1000)
    assert str(info.value).startswith("big.jsonl:2: line is longer than 1000 bytes")


def test_file_paths_are_shown_as_given(run, tmp_path):
    (tmp_path / "sub").mkdir()
    message = problem(run, {"sub/rows.jsonl": [{"messages": [U, {"role": "bot", "content": "x"}]}]})
    assert message.startswith("sub/rows.jsonl:1: ")


# -- policies ------------------------------------------------------------------------------------------
def rows_n(n: int) -> list[dict]:
    return [chat(f"question {i}", f"answer {i}") for i in range(n)]


def test_duplicates_drop_keep_and_error(run):
    rows = rows_n(10) + [rows_n(2)[1]]
    dropped = run({"d.jsonl": rows})
    assert dropped.report["duplicates"] == {"policy": "drop", "count": 1, "first": ["d.jsonl:11 = d.jsonl:2"]}
    assert dropped.report["dropped"]["duplicate"]["count"] == 1
    assert len(dropped.train) + len(dropped.eval) == 10

    kept = run({"d.jsonl": rows}, **{"data.duplicates": "keep"})
    assert len(kept.train) + len(kept.eval) == 11 and kept.report["dropped"]["duplicate"]["count"] == 0

    message = problem(run, {"d.jsonl": rows}, **{"data.duplicates": "error"})
    assert message.startswith("d.jsonl:11: duplicate of d.jsonl:2 (data.duplicates is error")


def test_too_long_drop_truncate_error(run):
    long_row = chat("word " * 200, "short answer")
    rows = rows_n(6) + [long_row]
    dropped = run({"l.jsonl": rows})
    assert dropped.report["too_long"]["count"] == 1 and dropped.report["dropped"]["too_long"]["first"] == [
        "l.jsonl:7"
    ]
    assert "l.jsonl:7" not in {ex.id for ex in dropped.train + dropped.eval}

    # truncation cannot save it: the prompt alone fills the window
    truncated = run({"l.jsonl": rows}, **{"data.too_long": "truncate"})
    assert truncated.report["dropped"]["prompt_fills_window"]["first"] == ["l.jsonl:7"]
    long_answer = rows_n(6) + [chat("short question", "word " * 200)]
    kept = run({"l.jsonl": long_answer}, **{"data.too_long": "truncate"})
    assert "l.jsonl:7" in {ex.id for ex in kept.train + kept.eval}

    message = problem(run, {"l.jsonl": rows}, **{"data.too_long": "error"})
    assert message.startswith("l.jsonl:7: ") and "longer than train.max_seq_length (128)" in message


def test_all_rows_too_long_is_an_error(run):
    message = problem(run, {"l.jsonl": rows_n(5)}, **{"train.max_seq_length": 10})
    assert message.startswith("l.jsonl: all 5 rows are longer than train.max_seq_length (10 tokens")


def test_system_prompt_is_added_only_where_missing(run):
    rows = [chat("a", "b"), chat("c", "d", system=True), {"text": "plain text row"}]
    result = run({"s.jsonl": rows}, **{"data.system_prompt": "Answer in JSON.", "data.eval_fraction": 0.01})
    by_id = {ex.id: ex for ex in result.train + result.eval}
    assert by_id["s.jsonl:1"].messages[0] == {"role": "system", "content": "Answer in JSON."}
    assert by_id["s.jsonl:2"].messages[0] == SYS
    assert by_id["s.jsonl:3"].messages[0]["content"] == "Answer in JSON."
    assert result.report["system_prompt_added"] == 2


# -- split and leakage ---------------------------------------------------------------------------------
def test_seeded_split_is_deterministic_and_sized(run):
    rows = rows_n(200)
    first = run({"s.jsonl": rows}, **{"data.eval_fraction": 0.1, "data.eval_max_rows": 15})
    again = run({"s.jsonl": rows}, **{"data.eval_fraction": 0.1, "data.eval_max_rows": 15})
    other = run(
        {"s.jsonl": rows}, **{"data.eval_fraction": 0.1, "data.eval_max_rows": 15, "data.split_seed": 7}
    )
    split = first.report["split"]
    assert split["eval_size"] == 15 and split["train_size"] == 185 and split["seed"] == 1234
    assert split["eval_ids"] == again.report["split"]["eval_ids"] == [ex.id for ex in first.eval]
    assert split["eval_ids"] != other.report["split"]["eval_ids"]
    assert set(split["train_ids"]).isdisjoint(split["eval_ids"])
    assert len(run({"s.jsonl": rows}, **{"data.eval_fraction": 0.05}).eval) == 10  # under the cap of 48


def test_seeded_split_keeps_a_shared_prompt_on_one_side(run):
    rows = [chat(f"Same   Prompt {i % 20}", f"answer {i}") for i in range(100)]  # 5 answers per prompt
    result = run({"s.jsonl": rows}, **{"data.eval_fraction": 0.2})
    prompts = lambda exs: {ex.messages[0]["content"] for ex in exs}  # noqa: E731
    assert prompts(result.train).isdisjoint(prompts(result.eval))
    assert len(result.eval) == 20 and result.report["leakage"]["count"] == 0


def test_leakage_between_eval_and_train_files_names_both(run):
    train = rows_n(10)
    held = [chat("other question", "x"), chat("  QUESTION   3 ", "a different answer")]
    message = problem(run, {"t.jsonl": train}, eval={"e.jsonl": held})
    assert message == (
        "e.jsonl:2: the same prompt is in the training data at t.jsonl:4 (train/eval leakage); remove it from one side"
    )


def test_eval_files_replace_the_split(run):
    result = run({"t.jsonl": rows_n(10)}, eval={"e.jsonl": [chat("held out", "x")]})
    assert [ex.id for ex in result.eval] == ["e.jsonl:1"] and len(result.train) == 10
    assert result.report["split"]["method"] == "eval files" and result.report["leakage"]["checked"]


# -- labels --------------------------------------------------------------------------------------------
LABELED = {"data.label_field": "category", "data.labels": ["billing", "shipping", "account", "technical"]}


def test_label_distribution(run):
    rows = ticket_rows(120, seed=3)
    result = run({"t.jsonl": rows}, **LABELED)
    labels = result.report["labels"]
    assert labels["field"] == "category"
    assert sum(labels["train"].values()) == len(result.train) and sum(labels["eval"].values()) == len(
        result.eval
    )
    assert {ex.label for ex in result.train} <= set(LABELED["data.labels"])
    assert labels["missing_from_train"] == []


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            '{"category": "refund"}',
            "messages[1].content: category 'refund' is not one of billing, shipping, account, technical",
        ),
        ("billing", "messages[1].content: the answer is not JSON, but data.label_field is 'category'"),
        ('{"kind": "billing"}', "messages[1].content: the answer has no 'category' key"),
        ('["billing"]', "messages[1].content: the answer is a JSON array, not an object"),
        ('{"category": null}', "messages[1].content: 'category' must be a string, got null"),
    ],
)
def test_label_problems(run, answer, expected):
    message = problem(run, {"t.jsonl": [chat("q", answer)]}, **LABELED)
    assert message.startswith(f"t.jsonl:1: {expected}"), message


# -- the report ----------------------------------------------------------------------------------------
def test_report_records_files_tokens_and_tokenizer(run, tmp_path):
    result = run({"t.jsonl": ticket_rows(60, seed=5)}, **LABELED)
    report = json.loads(json.dumps(result.report))  # JSON-able
    f = report["files"][0]
    assert f == {
        "role": "train",
        "name": "t.jsonl",
        "format": "jsonl",
        "sha256": sha256_file(tmp_path / "t.jsonl"),
        "bytes": (tmp_path / "t.jsonl").stat().st_size,
        "rows": 60,
    }
    tokens = report["tokens"]
    assert tokens["min"] <= tokens["p50"] <= tokens["p90"] <= tokens["p99"] <= tokens["max"]
    lengths = [ex.tokens for ex in result.train + result.eval]
    assert tokens["total"] == sum(lengths) and tokens["max"] == max(lengths)
    assert report["tokenizer"]["name"] == "builtin:tiny-qwen2" and report["tokenizer"]["chat_template_sha256"]
    text = render_report(report)
    assert "t.jsonl" in text and "p99" in text and "category" in text and "seeded (seed 1234)" in text


def test_example_id():
    assert Example([U, A], "data/train.jsonl", 17, "messages").id == "data/train.jsonl:17"
    assert Example([U, A], "a.json", "[3]", "messages").id == "a.json:[3]"


def test_data_module_imports_fast_and_light():
    code = "import sys, ft.data; print(sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- hostile sizes, the split after filtering, and warnings --------------------------------------------
def test_a_row_over_max_row_chars_is_refused_before_tokenising(run, tiny_tokenizer, monkeypatch):
    tokenised = []
    real_call = type(tiny_tokenizer).__call__
    monkeypatch.setattr(
        type(tiny_tokenizer), "__call__", lambda s, t, **k: tokenised.append(t) or real_call(s, t, **k)
    )
    rows = rows_n(5) + [chat("x" * 1000, "ok")]
    message = problem(run, {"big.jsonl": rows}, **{"data.max_row_chars": 500})
    assert message == (
        "big.jsonl:6: 1,002 characters, more than data.max_row_chars (500); "
        "shorten or split the row, or raise data.max_row_chars"
    )
    assert tokenised == []


def test_lengths_tokenise_no_more_of_a_row_than_max_seq_length_needs(run, tiny_tokenizer, monkeypatch):
    longest = []
    real_call = type(tiny_tokenizer).__call__

    def spy(self, texts, **kw):
        longest.append(max(map(len, texts if isinstance(texts, list) else [texts])))
        return real_call(self, texts, **kw)

    monkeypatch.setattr(type(tiny_tokenizer), "__call__", spy)
    huge = chat("word " * 200_000, "answer")  # 1,000,000 characters
    result = run({"h.jsonl": rows_n(20) + [huge]}, **{"data.max_row_chars": 2_000_000})
    assert max(longest) < 50_000, max(longest)
    assert result.report["dropped"]["too_long"]["first"] == ["h.jsonl:21"]
    assert result.report["too_long"]["first"] == ["h.jsonl:21 (over 128 tokens)"]
    assert result.report["tokens"]["max"] > 128 and result.report["tokens"]["partly_counted"] == 1
    assert "1 over-long counted in part" in render_report(result.report)


def test_bounded_lengths_are_exact_below_the_limit(tiny_tokenizer):
    from ft.data import bounded_token_lengths
    from ft.data.encode import token_lengths

    texts = ["short", "word " * 40, "x" * 5000, "héllo wörld " * 300]
    exact = token_lengths(tiny_tokenizer, texts)
    got = bounded_token_lengths(tiny_tokenizer, texts, 100_000)
    assert got == [(n, True) for n in exact]
    capped = bounded_token_lengths(tiny_tokenizer, texts, 50)
    for (n, is_exact), real in zip(capped, exact, strict=True):
        if real <= 50 or is_exact:
            assert (n, is_exact) == (real, True)
        else:
            assert 50 < n <= real  # a lower bound that still says "over"
    assert not capped[3][1]  # the long text was not tokenised whole


def test_the_split_is_drawn_after_over_long_rows_are_dropped(run):
    short = rows_n(40)
    long_rows = [chat(f"long {i} " + "word " * 200, "a") for i in range(60)]
    rows = [r for pair in zip(long_rows[:40], short, strict=True) for r in pair] + long_rows[40:]
    result = run({"m.jsonl": rows}, **{"data.eval_fraction": 0.25})
    assert len(result.eval) == 10 and len(result.train) == 30
    assert all(ex.tokens <= 128 for ex in result.eval)
    split = result.report["split"]
    assert split["eval_size"] == 10 and split["train_size"] == 30
    warning = result.report["warnings"]
    assert warning == [
        "60 of 100 rows (60%) were dropped (too long: 60); check train.max_seq_length and data.too_long"
    ]
    assert "warning: 60 of 100 rows (60%) were dropped" in render_report(result.report)


def test_no_warning_when_most_rows_are_kept(run):
    result = run({"m.jsonl": rows_n(10) + [chat("word " * 200, "a")]})
    assert result.report["warnings"] == [] and "warning" not in render_report(result.report)


def test_every_problem_reaches_on_problem_past_the_cap(tmp_path, monkeypatch, tiny_settings, tiny_tokenizer):
    monkeypatch.chdir(tmp_path)
    bad = {"messages": [U, {"role": "bot", "content": "x"}]}
    write(tmp_path / "rows.jsonl", [bad] * 80)
    seen: list[str] = []
    with pytest.raises(DataError) as info:
        check(
            tiny_settings(**{"data.train": ["rows.jsonl"]}), tokenizer=tiny_tokenizer, on_problem=seen.append
        )
    assert len(seen) == 80 and info.value.total == 80 and seen[79].startswith("rows.jsonl:80: ")


def test_data_errors_come_before_the_tokenizer_is_loaded(tmp_path, monkeypatch, tiny_settings):
    import ft.modelref
    from ft.pipeline import check_data

    def no_download(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded before the rows were validated")

    monkeypatch.setattr(ft.modelref, "load_tokenizer", no_download)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.jsonl").write_bytes(b"")
    write(tmp_path / "dups.jsonl", rows_n(3) + rows_n(1))
    write(tmp_path / "t.jsonl", rows_n(3))
    write(tmp_path / "e.jsonl", [chat("question 1", "leaked")])
    for overrides, expected in [
        ({"data.train": ["empty.jsonl"]}, "empty.jsonl: no rows"),
        ({"data.train": ["dups.jsonl"], "data.duplicates": "error"}, "dups.jsonl:4: duplicate"),
        ({"data.train": ["t.jsonl"], "data.eval": ["e.jsonl"]}, "e.jsonl:1: the same prompt"),
    ]:
        with pytest.raises(DataError, match=expected):
            check_data(tiny_settings(**overrides))


def test_prompt_key_collapses_whitespace_as_str_split_does_chunk_by_chunk():
    import hashlib
    import random

    from ft.data import _collapsed, prompt_key

    rng = random.Random(0)
    alphabet = ["a", "B", "ß", " ", "  ", "\n", "\t", "\u3000", "\x1c", "\u2028", "Σ", "é"]
    texts = ["", " ", "x", "  a  b\n c "] + [
        "".join(rng.choices(alphabet, k=rng.randint(1, 60))) for _ in range(300)
    ]
    for text in texts:
        for chunk in (1, 2, 3, 7, 1 << 20):
            assert "".join(_collapsed(text, chunk)) == " ".join(text.split()), (text, chunk)
    for text in texts[:50]:  # the digest is that of the whole normalised text, as before
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
        whole = "\x1f".join(f"{m['role']}\x1e{' '.join(m['content'].split()).casefold()}" for m in messages)
        assert prompt_key(messages) == hashlib.blake2b(whole.encode(), digest_size=16).digest()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"text": "' + "x" * 5000 + '"}\n', "big.jsonl:1: line is longer than 1000 bytes"),  # first line
        ('{"text": oops}\n\n', "big.jsonl:1: invalid JSON: Expecting value"),  # no valid row at all
        ("\n  \n", "big.jsonl: no rows (the file is empty)"),
    ],
)
def test_a_file_without_rows_gives_one_problem_not_two(
    content, expected, tmp_path, monkeypatch, tiny_settings, tiny_tokenizer
):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "big.jsonl", content)
    with pytest.raises(DataError) as info:
        check(tiny_settings(**{"data.train": ["big.jsonl"]}), tokenizer=tiny_tokenizer, max_line_bytes=1000)
    assert info.value.total == 1 and str(info.value).startswith(expected), info.value.problems
