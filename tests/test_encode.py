"""ft.data.encode: labels cover exactly the assistant turns (content + end of turn), truncation, eval prompts."""

from __future__ import annotations

import pytest

from ft.data import Example
from ft.data.encode import IGNORE, encode, prompt_and_reference
from ft.errors import FtError

END = "<|im_end|>\n"  # what the tiny model's ChatML template closes every turn with


def ex(*turns: tuple[str, str], line: int = 1) -> Example:
    return Example([{"role": r, "content": c} for r, c in turns], "t.jsonl", line, "messages")


def labelled_runs(tokenizer, row: dict) -> list[str]:
    """Decode each maximal run of labelled tokens separately."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


@pytest.fixture
def fresh_tokenizer(tiny_model_dir):
    """A private copy of the tiny tokenizer, for tests that change its chat template."""
    from ft.modelref import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def test_single_turn_labels_are_the_answer_and_end_of_turn(tiny_tokenizer):
    example = ex(
        ("system", "Be brief."),
        ("user", "From Alice in Paris: my parcel has not arrived."),
        ("assistant", '{"name": "Alice", "city": "Paris", "category": "shipping"}'),
    )
    (row,) = encode([example], tiny_tokenizer, 512)
    assert labelled_runs(tiny_tokenizer, row) == [
        '{"name": "Alice", "city": "Paris", "category": "shipping"}' + END
    ]
    full = tiny_tokenizer.apply_chat_template(example.messages, tokenize=False)
    assert tiny_tokenizer.decode(row["input_ids"]) == full
    header = tiny_tokenizer.decode(
        row["input_ids"][: row["labels"].index(next(x for x in row["labels"] if x != IGNORE))]
    )
    assert header.endswith("<|im_start|>assistant\n")  # the header is prompt, not label


def test_multi_turn_and_tool_turns_label_every_assistant_turn_only(tiny_tokenizer):
    example = ex(
        ("user", "hi"),
        ("assistant", "call lookup"),
        ("tool", "result 42"),
        ("assistant", "It is 42."),
        ("user", "thanks"),
        ("assistant", "You are welcome 😀 é"),
    )
    (row,) = encode([example], tiny_tokenizer, 512)
    assert labelled_runs(tiny_tokenizer, row) == [
        "call lookup" + END,
        "It is 42." + END,
        "You are welcome 😀 é" + END,
    ]


def test_all_tokens_are_labels_without_assistant_only(tiny_tokenizer):
    (row,) = encode([ex(("user", "hi"), ("assistant", "yo"))], tiny_tokenizer, 512, assistant_only=False)
    assert row["labels"] == row["input_ids"]


def test_text_rows_train_on_the_whole_text(tiny_tokenizer):
    example = Example([{"role": "assistant", "content": "Once upon a time."}], "t.jsonl", 1, "text")
    (row,) = encode([example], tiny_tokenizer, 512)
    assert labelled_runs(tiny_tokenizer, row) == ["Once upon a time." + END]
    assert prompt_and_reference(example, tiny_tokenizer) == ("<|im_start|>assistant\n", "Once upon a time.")


def test_any_incremental_template_works(fresh_tokenizer):
    fresh_tokenizer.chat_template = (
        "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
        "{% if add_generation_prompt %}### assistant:\n{% endif %}"
    )
    (row,) = encode(
        [ex(("user", "Add 2 and 3"), ("assistant", "5"), ("user", "and 4?"), ("assistant", "9"))],
        fresh_tokenizer,
        512,
    )
    assert labelled_runs(fresh_tokenizer, row) == ["5\n\n", "9\n\n"]


def test_a_template_that_rewrites_earlier_turns_is_refused(fresh_tokenizer):
    # Mentions the number of messages up front, so a shorter conversation is not a prefix of a longer one.
    fresh_tokenizer.chat_template = (
        "{{ messages|length }} turns\n{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(
        FtError, match=r"t.jsonl:1: the chat template does not render conversations incrementally"
    ):
        encode([ex(("user", "hi"), ("assistant", "yo"))], fresh_tokenizer, 512)


def test_truncation_keeps_the_start_and_drops_rows_without_labels(tiny_tokenizer):
    long_answer = ex(("user", "short"), ("assistant", "word " * 100), line=1)
    long_prompt = ex(("user", "word " * 100), ("assistant", "yo"), line=2)
    (full,) = encode([long_answer], tiny_tokenizer, 10_000)
    stats: dict = {}
    rows = encode([long_answer, long_prompt], tiny_tokenizer, 40, "truncate", stats=stats)
    assert len(rows) == 1
    assert rows[0]["input_ids"] == full["input_ids"][:40] and rows[0]["labels"] == full["labels"][:40]
    assert stats == {
        "rows_in": 2,
        "rows_out": 1,
        "truncated": 2,
        "dropped_too_long": 0,
        "dropped_no_labels": 1,
    }


def test_too_long_drop_and_error(tiny_tokenizer):
    rows = [
        ex(("user", "hi"), ("assistant", "yo"), line=1),
        ex(("user", "word " * 100), ("assistant", "yo"), line=2),
    ]
    stats: dict = {}
    assert len(encode(rows, tiny_tokenizer, 40, "drop", stats=stats)) == 1 and stats["dropped_too_long"] == 1
    with pytest.raises(FtError, match=r"t.jsonl:2: \d+ tokens, longer than train.max_seq_length \(40\)"):
        encode(rows, tiny_tokenizer, 40, "error")


def test_lengths_agree_with_the_data_check(tiny_tokenizer, tiny_settings, tmp_path, monkeypatch):
    from ft.data import check
    from ft.testing import ticket_rows, write_jsonl

    monkeypatch.chdir(tmp_path)
    write_jsonl("t.jsonl", ticket_rows(40, seed=9))
    result = check(tiny_settings(**{"data.train": ["t.jsonl"]}), tokenizer=tiny_tokenizer)
    rows = encode(result.train, tiny_tokenizer, 512)
    assert [len(r["input_ids"]) for r in rows] == [e.tokens for e in result.train]


def test_prompt_and_reference(tiny_tokenizer):
    example = ex(("system", "S"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"))
    prompt, reference = prompt_and_reference(example, tiny_tokenizer)
    assert reference == "a2"
    assert prompt == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n"
    )
