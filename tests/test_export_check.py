"""The export check scores an exported model's answers the way `ft eval` scored the adapter's."""

from __future__ import annotations

import json
from types import SimpleNamespace

from ft.export.check import load_reference, score_answers

CALL = [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


def _settings():
    return SimpleNamespace(eval=SimpleNamespace(json_schema=None), data=SimpleNamespace(label_field=None))


def test_tool_call_answers_of_an_export_are_scored_as_calls(tmp_path):
    """Without the reference's calls, the tool metrics of a tool-calls bundle read as dropped to nothing."""
    (tmp_path / "eval").mkdir()
    rows = [
        {"prompt": "p1", "reference": CALL_TEXT, "tuned": CALL_TEXT, "reference_calls": CALL},
        {"prompt": "p2", "reference": "It is sunny.", "tuned": "It is sunny."},
    ]
    rows = [
        {
            **r,
            "tuned_scores": {
                "exact_match": 1.0,
                **({"tool_call_exact": 1.0} if "reference_calls" in r else {}),
            },
        }
        for r in rows
    ]
    (tmp_path / "eval" / "predictions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ref = load_reference(tmp_path)
    assert ref.metrics["tool_call_exact"] == 1.0

    same = score_answers(_settings(), ref, [CALL_TEXT, "It is sunny."])
    assert same["tool_call_exact"] == 1.0 and same["tool_name_match"] == 1.0
    wrong = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bergen"}}\n</tool_call>'
    moved = score_answers(_settings(), ref, [wrong, "It is sunny."])
    assert moved["tool_call_exact"] == 0.0 and moved["tool_name_match"] == 1.0
