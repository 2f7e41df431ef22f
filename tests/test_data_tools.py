"""Tool-calling rows kept whole, content as a list of parts, reasoning, and the tool-call metric."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ft.data import DataError, Example, check
from ft.data.encode import IGNORE, encode, prompt_and_reference, render_chats
from ft.data.shapes import RowProblem, normalise_row
from ft.eval.metrics import average, parse_tool_calls, score, tool_call_scores

try:
    from ft.data.chat_templates import QWEN25
except ImportError:  # the shipped templates' first home
    from test_export_modelfile import QWEN25

WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TICKET = {
    "name": "create_ticket",
    "description": "Open a support ticket.",
    "parameters": {"type": "object", "properties": {"title": {"type": "string"}}},
}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TICKET}]


def call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def tool_row(city: str, *, answer: bool = True) -> dict:
    """A chat row: a question, a weather call, its result and (optionally) the answer from it."""
    messages = [
        {"role": "user", "content": f"Weather in {city}?"},
        {"role": "assistant", "content": None, "tool_calls": [call("get_weather", city=city)]},
    ]
    if answer:
        messages += [
            {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": '{"temp": 21}'},
            {"role": "assistant", "content": f"21 degrees in {city}."},
        ]
    return {"messages": messages, "tools": TOOLS}


def write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tool_model_dir(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """The tiny model with Qwen2.5's chat template, which renders tools and tool calls."""
    out = tmp_path_factory.mktemp("tiny-tools")
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, out / f.name)
    (out / "chat_template.jinja").write_text(QWEN25, encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def tool_tokenizer(tool_model_dir: Path):
    from ft.modelref import load_tokenizer

    tok = load_tokenizer(str(tool_model_dir))
    assert "tools" in tok.chat_template
    return tok


@pytest.fixture
def run(tmp_path, monkeypatch, tiny_settings):
    """run(rows, tokenizer, **overrides) -> CheckResult on rows.jsonl."""
    monkeypatch.chdir(tmp_path)

    def go(rows, tokenizer, **overrides):
        write(tmp_path / "rows.jsonl", rows)
        settings = tiny_settings(**{"data.train": ["rows.jsonl"], "train.max_seq_length": 1024, **overrides})
        return check(settings, tokenizer=tokenizer)

    return go


def problem_of(row: dict) -> str:
    with pytest.raises(RowProblem) as info:
        normalise_row(row, "auto")
    return f"{info.value.field}: {info.value.problem}"


# -- shapes --------------------------------------------------------------------------------------------
def test_llama_factory_sharegpt_with_function_call_observation_and_tools_column():
    row = {
        "conversations": [
            {"from": "human", "value": "Weather in Oslo?"},
            {
                "from": "function_call",
                "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}}),
            },
            {"from": "observation", "value": '{"temp": 3}'},
            {"from": "gpt", "value": "3 degrees in Oslo."},
        ],
        "system": "Be brief.",
        "tools": json.dumps([WEATHER, TICKET]),  # LLaMA-Factory: a JSON string of bare functions
    }
    normal = normalise_row(row, "auto")
    assert normal.shape == "sharegpt"
    assert normal.tools == TOOLS
    assert normal.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Oslo")]},
        {"role": "tool", "content": '{"temp": 3}'},
        {"role": "assistant", "content": "3 degrees in Oslo."},
    ]
    # Arguments given as a JSON string (OpenAI's wire form) parse to the same object.
    row["conversations"][1]["value"] = json.dumps({"name": "get_weather", "arguments": '{"city": "Oslo"}'})
    assert normalise_row(row, "auto").messages[2]["tool_calls"] == [call("get_weather", city="Oslo")]


def test_messages_with_tool_calls_keep_ids_and_end_on_a_call():
    row = tool_row("Lima", answer=False)
    row["messages"][1]["tool_calls"][0]["id"] = "call_7"
    normal = normalise_row(row, "auto")
    assert normal.messages[-1] == {
        "role": "assistant",
        "content": "",  # an assistant turn that only calls tools is valid
        "tool_calls": [{**call("get_weather", city="Lima"), "id": "call_7"}],
    }
    assert normal.answer_field == "messages[1].tool_calls"
    tool_turn = normalise_row(tool_row("Lima"), "auto").messages[2]
    assert tool_turn == {
        "role": "tool",
        "content": '{"temp": 21}',
        "tool_call_id": "c1",
        "name": "get_weather",
    }


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments='{"city": '),
            "messages[1].tool_calls[0].function.arguments: not valid JSON",
        ),
        (
            lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="[1, 2]"),
            "messages[1].tool_calls[0].function.arguments: expected a JSON object, got array",
        ),
        (
            lambda r: r["messages"][1]["tool_calls"][0]["function"].update(name="get_wether"),
            "messages[1].tool_calls[0].function.name: 'get_wether' is not one of the row's tools "
            "(get_weather, create_ticket)",
        ),
        (
            lambda r: r["messages"][1].update(content=""),  # still fine: it calls a tool
            None,
        ),
        (
            lambda r: r["messages"][1].pop("tool_calls"),
            "messages[1].content: expected a string, got null (an array of text parts also works)",
        ),
        (
            lambda r: r["messages"][0].update(tool_calls=[call("get_weather")]),
            "messages[0].tool_calls: only assistant turns call tools, not user",
        ),
        (lambda r: r.update(tools="[{"), "tools: not valid JSON (a tools string must hold a JSON array)"),
        (lambda r: r.update(tools=[{"description": "x"}]), "tools[0].name: missing"),
    ],
)
def test_tool_errors_name_the_field(mutate, expected):
    row = tool_row("Oslo")
    mutate(row)
    if expected is None:
        normalise_row(row, "auto")
    else:
        assert problem_of(row) == expected


def test_sharegpt_function_call_with_broken_json_names_the_turn():
    row = {
        "conversations": [
            {"from": "human", "value": "Weather?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": }'},
        ],
        "tools": [WEATHER],
    }
    assert problem_of(row).startswith("conversations[1].value: not valid JSON")


def test_content_as_a_list_of_text_parts_is_joined_in_order():
    row = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hello "}, {"type": "text", "value": "there"}],
            },
            {"role": "assistant", "content": [{"type": "text", "value": "Hi!"}]},
        ]
    }
    assert normalise_row(row, "auto").messages == [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi!"},
    ]


@pytest.mark.parametrize("part", ["image_url", "image", "input_audio", "video"])
def test_media_parts_are_refused_in_one_line(part):
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": part}]},
            {"role": "assistant", "content": "A cat."},
        ]
    }
    assert problem_of(row) == (
        f"messages[0].content[1].type: a part of type '{part}': ft trains text only; "
        "remove image, audio and video parts"
    )


def _reasoning_rows() -> list[dict]:
    as_key = {
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "reasoning_content": "Two and two make four.", "content": "4"},
        ]
    }
    as_part = {
        "messages": [
            {"role": "user", "content": "3+3?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "value": "Three and three: six."},
                    {"type": "text", "value": "6"},
                ],
            },
        ]
    }
    return [as_key, as_part]


def test_reasoning_key_or_part_becomes_reasoning_content():
    first, second = (normalise_row(r, "auto").messages[1] for r in _reasoning_rows())
    assert first == {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."}
    assert second == {"role": "assistant", "content": "6", "reasoning_content": "Three and three: six."}


@pytest.mark.parametrize("policy", ["keep", "drop"])
def test_reasoning_keep_trains_on_it_and_drop_removes_it(run, tiny_tokenizer, policy):
    rows = _reasoning_rows() * 1 + [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(4)
    ]
    result = run(rows, tiny_tokenizer, **{"data.reasoning": policy})
    examples = [ex for ex in result.train + result.eval if ex.messages[0]["content"] == "2+2?"]
    (row,) = encode(examples, tiny_tokenizer, 512)
    labelled = tiny_tokenizer.decode([t for t in row["labels"] if t != IGNORE])
    print(f"data.reasoning={policy}: labelled {labelled!r}")
    # The tiny ChatML template ignores `reasoning_content`, so keep writes it inline, as <think>...</think>.
    if policy == "keep":
        assert labelled == "<think>\nTwo and two make four.\n</think>\n\n4<|im_end|>\n"
    else:
        assert labelled == "4<|im_end|>\n"
    assert result.report["tools"]["rows_with_reasoning"] == (2 if policy == "keep" else 0)
    assert result.report["tools"]["reasoning_policy"] == policy


def test_reasoning_goes_to_a_template_that_renders_reasoning_content(fresh_tokenizer):
    fresh_tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.reasoning_content %}[think]{{ m.reasoning_content }}[/think]{% endif %}"
        "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (msgs,) = (normalise_row(r, "auto").messages for r in _reasoning_rows()[:1])
    text = render_chats(fresh_tokenizer, [msgs])[0]
    assert "[think]Two and two make four.[/think]4<|im_end|>" in text
    assert "<think>" not in text


@pytest.fixture
def fresh_tokenizer(tiny_model_dir):
    from ft.modelref import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


# -- rendering and labels ------------------------------------------------------------------------------
def test_rendered_training_text_shows_the_tool_calls_and_the_labels_cover_them(run, tool_tokenizer):
    rows = [tool_row(city) for city in ("Oslo", "Lima", "Cairo", "Perth")]
    result = run(rows, tool_tokenizer)
    assert result.report["tools"] == {
        "rows_with_tools": 4,
        "rows_with_tool_calls": 4,
        "tool_calls": 4,
        "rows_with_reasoning": 0,
        "reasoning_policy": "keep",
    }
    from ft.data import render_report

    assert "4 rows define tools; 4 rows call them (4 calls)" in render_report(result.report)
    example = next(ex for ex in result.train + result.eval if "Oslo" in ex.messages[0]["content"])
    assert example.tools == TOOLS
    (row,) = encode([example], tool_tokenizer, 1024)
    text = tool_tokenizer.decode(row["input_ids"])
    print(text)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text  # tools in the prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    runs = labelled_runs(tool_tokenizer, row)
    print(runs)
    assert runs == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n',
        "21 degrees in Oslo.<|im_end|>\n",
    ]


def test_llama_factory_sharegpt_file_checks_and_trains_on_its_calls(run, tool_tokenizer):
    rows = [
        {
            "conversations": [
                {"from": "human", "value": f"Open a ticket: {title}"},
                {
                    "from": "function_call",
                    "value": json.dumps({"name": "create_ticket", "arguments": {"title": title}}),
                },
                {"from": "observation", "value": '{"id": "T-1"}'},
                {"from": "gpt", "value": "Opened T-1."},
            ],
            "tools": json.dumps([WEATHER, TICKET]),
        }
        for title in ("Login fails", "Wrong invoice", "App crashes", "Slow sync")
    ]
    result = run(rows, tool_tokenizer)
    assert result.report["shapes"] == {"sharegpt": 4}
    assert result.report["tools"]["rows_with_tool_calls"] == 4
    example = next(ex for ex in result.train + result.eval if "Login" in ex.messages[0]["content"])
    (row,) = encode([example], tool_tokenizer, 1024)
    text = tool_tokenizer.decode(row["input_ids"])
    print(text)
    assert '<tool_response>\n{"id": "T-1"}\n</tool_response>' in text  # the observation, as Qwen writes it
    assert labelled_runs(tool_tokenizer, row) == [
        '<tool_call>\n{"name": "create_ticket", "arguments": {"title": "Login fails"}}\n</tool_call><|im_end|>\n',
        "Opened T-1.<|im_end|>\n",
    ]


def labelled_runs(tokenizer, row: dict) -> list[str]:
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(token)
    return [tokenizer.decode(r) for r in runs + ([current] if current else [])]


def test_rows_with_different_tools_render_with_their_own(tool_tokenizer):
    only_weather = Example(
        normalise_row(tool_row("Oslo"), "auto").messages, "t", 1, "messages", tools=TOOLS[:1]
    )
    both = Example(normalise_row(tool_row("Lima"), "auto").messages, "t", 2, "messages", tools=TOOLS)
    plain = Example(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "t", 3, "messages"
    )
    texts = render_chats(
        tool_tokenizer,
        [e.messages for e in (only_weather, both, plain)],
        tools=[e.tools for e in (only_weather, both, plain)],
    )
    assert "create_ticket" not in texts[0] and "create_ticket" in texts[1] and "<tools>" not in texts[2]
    rows = encode([only_weather, both, plain], tool_tokenizer, 1024)
    assert [tool_tokenizer.decode(r["input_ids"]) for r in rows] == texts


def test_eval_prompt_includes_the_tools_and_the_reference_is_the_rendered_call(tool_tokenizer):
    example = Example(
        normalise_row(tool_row("Oslo", answer=False), "auto").messages, "t", 1, "messages", tools=TOOLS
    )
    prompt, reference = prompt_and_reference(example, tool_tokenizer)
    assert "<tools>" in prompt and prompt.endswith(
        "<|im_start|>user\nWeather in Oslo?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert reference == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert (
        tool_call_scores(reference, [{"name": "get_weather", "arguments": {"city": "Oslo"}}])[
            "tool_call_exact"
        ]
        == 1.0
    )


def test_template_without_tool_support_is_one_line_at_data_check(run, tiny_tokenizer):
    rows = [tool_row(city) for city in ("Oslo", "Lima", "Cairo")]
    with pytest.raises(DataError) as info:
        run(rows, tiny_tokenizer)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "rows.jsonl:1: this row and 2 more have tools or tool calls, but the model's chat "
    )
    assert "has no tool support (it ignores `tools`" in message


def test_template_that_raises_on_tools_is_reported_too(run, fresh_tokenizer):
    fresh_tokenizer.chat_template = (
        "{% if tools %}{{ raise_exception('tools are not supported') }}{% endif %}"
        + fresh_tokenizer.chat_template
    )
    with pytest.raises(DataError) as info:
        run([tool_row("Oslo"), tool_row("Lima")], fresh_tokenizer)
    assert "it fails on them: tools are not supported" in str(info.value)


# -- the metric ----------------------------------------------------------------------------------------
REF = [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}]


@pytest.mark.parametrize(
    ("generated", "exact", "name"),
    [
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"unit": "celsius", "city": "Oslo"}}\n</tool_call>',
            1,
            1,
        ),
        ('{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}', 1, 1),  # bare JSON
        ('{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\", \\"unit\\": \\"celsius\\"}"}', 1, 1),
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}',
            1,
            1,
        ),  # cut off
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima", "unit": "celsius"}}\n</tool_call>',
            0,
            1,
        ),
        (
            '<tool_call>\n{"name": "create_ticket", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>',
            0,
            0,
        ),
        ("It is sunny in Oslo.", 0, 0),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"', 0, 0),  # broken JSON
    ],
)
def test_tool_call_metric_scores_right_and_wrong_calls(generated, exact, name):
    scores = score(generated, "ref text", ref_calls=REF)
    assert (scores["tool_call_exact"], scores["tool_name_match"]) == (exact, name)


def test_parallel_calls_match_in_any_order_and_all_must_be_right():
    ref = [
        {"name": "get_weather", "arguments": {"city": "Oslo"}},
        {"name": "get_weather", "arguments": {"city": "Lima"}},
    ]
    both = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    )
    assert tool_call_scores(both, ref) == {"tool_call_exact": 1.0, "tool_name_match": 1.0}
    one = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>'
    assert tool_call_scores(one, ref) == {"tool_call_exact": 0.0, "tool_name_match": 0.0}
    assert parse_tool_calls('[{"type": "function", "function": {"name": "f", "arguments": {}}}]') == [
        {"name": "f", "arguments": {}}
    ]


def test_plain_answers_get_no_tool_metric_and_the_average_skips_them():
    plain = score("yo", "yo")
    tool = score("It is sunny.", "<tool_call>...", ref_calls=REF)
    assert "tool_call_exact" not in plain
    mean = average([plain, tool, score(json.dumps(REF[0]), "x", ref_calls=REF)])
    assert mean["tool_call_exact"] == 0.5  # over the two tool-call rows only
    assert mean["exact_match"] == round(1 / 3, 6)


# -- the CLI and a run ---------------------------------------------------------------------------------
# The tiny tokenizer's 600-token vocabulary spells the rows out in about twice Qwen's tokens (1,113 to
# 1,318 here against ~500 under Qwen2.5's), so the recipe's 1,024 is raised for it.
TINY_LENGTH = "train.max_seq_length=2048"


def test_tool_calls_recipe_data_passes_ft_data_check(tool_model_dir, capsys):
    from ft.cli import main

    args = ["data", "check", "--recipe", "tool-calls", "--set", f"model.name_or_path={tool_model_dir}"]
    assert main([*args, "--set", TINY_LENGTH]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "96 rows read" in out and "96 rows define tools; 84 rows call them (90 calls)" in out


def test_tool_calls_recipe_with_the_tiny_model_and_a_tool_template(tiny_model_dir, capsys):
    from ft.cli import main

    args = ["data", "check", "--recipe", "tool-calls", "--set", f"model.name_or_path={tiny_model_dir}"]
    assert main([*args, "--set", TINY_LENGTH, "--set", "data.chat_template=qwen2.5"]) == 0
    assert "84 rows call them" in capsys.readouterr().out


def test_tool_calls_recipe_under_a_template_without_tools_is_exit_2_in_one_line(tiny_model_dir, capsys):
    from ft.cli import main

    args = ["data", "check", "--recipe", "tool-calls", "--set", f"model.name_or_path={tiny_model_dir}"]
    assert main([*args, "--set", TINY_LENGTH]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no tool support" in err, err


def test_tiny_run_on_tool_rows_finishes(tool_model_dir, tmp_path, monkeypatch, capsys):
    from ft.cli import main

    monkeypatch.chdir(tmp_path)
    rows = [tool_row(c) for c in ("Oslo", "Lima", "Cairo")]
    rows += [tool_row(c, answer=False) for c in ("Hanoi", "Denver", "Lagos", "Paris", "Perth", "Quito")]
    for row in rows:  # one function keeps the rows short: the point is that the run finishes and scores
        row["tools"] = TOOLS[:1]
    write(tmp_path / "tools.jsonl", rows)
    args = [
        "run",
        "--recipe",
        "tiny",
        "--train",
        "tools.jsonl",
        "--no-package",
        "--set",
        f"model.name_or_path={tool_model_dir}",
    ]
    for setting in (
        "data.label_field=null",
        "data.labels=null",
        "eval.json_schema=null",
        "eval.primary_metric=tool_call_exact",
        "eval.guard_metrics=[tool_name_match]",
        "train.max_seq_length=1024",
        "train.epochs=1",
        "data.eval_fraction=0.34",
        "eval.max_new_tokens=16",
        f"output.dir={tmp_path / 'runs'}",
    ):
        args += ["--set", setting]
    code = main(args)
    captured = capsys.readouterr()
    assert code in (0, 1), captured.err  # a random model may well DISCARD; the run must finish
    (path,) = (tmp_path / "runs").glob("*/eval/report.json")
    report = json.loads(path.read_text())
    metrics = report["metrics"]["tuned"]
    print(metrics)
    assert "tool_call_exact" in metrics and "tool_name_match" in metrics
