"""Scoring and the keep/discard rule, without a model."""

from __future__ import annotations

import jsonschema
import pytest

from ft.config import EvalSettings
from ft.eval.metrics import decide, exact_match, parse_json, score, token_f1
from ft.testing import TICKET_SCHEMA


def test_exact_match_ignores_surrounding_and_repeated_whitespace():
    assert exact_match(' {"a": 1} \n', '{"a":  1}') == 1.0
    assert exact_match('{"a": 1}', '{"a": 2}') == 0.0
    assert exact_match('{"A": 1}', '{"a": 1}') == 0.0  # case matters in a strict format


def test_token_f1():
    assert token_f1("the cat sat", "the cat sat") == 1.0
    assert token_f1("", "") == 1.0
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("the cat", "the cat sat") == pytest.approx(0.8)


def test_json_schema_and_label_scores():
    v = jsonschema.Draft202012Validator(TICKET_SCHEMA)
    ref = '{"name": "Ann", "city": "Oslo", "category": "billing"}'
    good = score(ref, ref, validator=v, label_field="category")
    assert good == {
        "exact_match": 1.0,
        "token_f1": 1.0,
        "json_valid": 1.0,
        "schema_valid": 1.0,
        "label_accuracy": 1.0,
    }
    wrong_label = score(
        '{"name": "Ann", "city": "Oslo", "category": "refund"}', ref, validator=v, label_field="category"
    )
    assert (wrong_label["json_valid"], wrong_label["schema_valid"], wrong_label["label_accuracy"]) == (
        1.0,
        0.0,
        0.0,
    )
    prose = score("Sure! Here it is", ref, validator=v, label_field="category")
    assert prose["json_valid"] == prose["schema_valid"] == prose["label_accuracy"] == 0.0
    assert parse_json('```json\n{"a": 1}\n```') == {"a": 1}


def _rule(**kw):
    return EvalSettings(
        **{
            "primary_metric": "exact_match",
            "min_improvement": 0.1,
            "guard_metrics": ["json_valid", "eval_loss"],
            "max_regression": 0.02,
            **kw,
        }
    )


def test_keep_when_primary_improves_and_guards_hold():
    d = decide(
        {"exact_match": 0.1, "json_valid": 0.5, "eval_loss": 2.0},
        {"exact_match": 0.9, "json_valid": 1.0, "eval_loss": 0.5},
        _rule(),
    )
    assert d.verdict == "KEEP"
    assert d.deltas == {"exact_match": 0.8, "json_valid": 0.5, "eval_loss": 1.5}
    assert d.reasons[0].startswith("primary exact_match")


def test_discard_when_primary_improvement_too_small():
    d = decide(
        {"exact_match": 0.5, "json_valid": 1.0, "eval_loss": 1.0},
        {"exact_match": 0.55, "json_valid": 1.0, "eval_loss": 1.0},
        _rule(),
    )
    assert d.verdict == "DISCARD"
    assert "FAILS" in d.reasons[0]


def test_discard_when_a_guard_falls_too_far_in_its_own_direction():
    # eval_loss rising (getting worse) by more than the allowed regression fails the guard.
    d = decide(
        {"exact_match": 0.1, "json_valid": 1.0, "eval_loss": 1.0},
        {"exact_match": 0.9, "json_valid": 1.0, "eval_loss": 1.5},
        _rule(),
    )
    assert d.verdict == "DISCARD"
    assert any(r.startswith("guard eval_loss") and "FAILS" in r for r in d.reasons)


def test_unmeasured_primary_metric_cannot_keep():
    d = decide({"json_valid": 1.0}, {"json_valid": 1.0}, _rule(guard_metrics=[]))
    assert d.verdict == "DISCARD"


def test_reasons_say_improved_or_worsened_in_the_metric_s_own_direction():
    # A falling eval_loss is an improvement: the line must not read as a rise ("change +2.0956").
    d = decide(
        {"exact_match": 0.5, "json_valid": 1.0, "eval_loss": 3.0},
        {"exact_match": 0.4, "json_valid": 0.5, "eval_loss": 0.9044},
        _rule(),
    )
    loss = next(r for r in d.reasons if r.startswith("guard eval_loss"))
    assert "improved by 2.0956" in loss and "+2.0956" not in loss and loss.endswith("ok")
    assert "lower is better" in loss
    valid = next(r for r in d.reasons if r.startswith("guard json_valid"))
    assert "worsened by 0.5000" in valid and valid.endswith("FAILS")
    assert "worsened by 0.1000" in d.reasons[0] and d.reasons[0].endswith("FAILS")
    worse = decide(
        {"exact_match": 0.1, "json_valid": 1.0, "eval_loss": 1.0},
        {"exact_match": 0.9, "json_valid": 1.0, "eval_loss": 1.5},
        _rule(),
    )
    loss = next(r for r in worse.reasons if r.startswith("guard eval_loss"))
    assert "worsened by 0.5000" in loss and "may worsen by at most 0.0200" in loss
    assert "unchanged" in next(r for r in worse.reasons if r.startswith("guard json_valid"))
