"""Format checks on Markdown answers (the house-style recipe's primary metric), without a model."""

from __future__ import annotations

import pytest

from ft.eval.format_checks import headings, headings_match
from ft.eval.metrics import average, score

REF = """# Rotate the staging database password

**Who this is for:** on-call engineers.

## Before you start

- Admin access.

## Steps

1. Run:
   ```bash
   # not a heading: a shell comment inside a code block
   rotate --env staging
   ```

## Check it worked

Log in.

## If something goes wrong

No known problems.
"""


def test_headings_skip_code_blocks_and_normalise_spaces():
    assert headings("#  Title  ##\n```\n# comment\n```\n##   Steps\n#nospace\n    ## indented code\n") == [
        (1, "Title"),
        (2, "Steps"),
    ]


def test_reference_against_itself_and_against_prose():
    assert headings_match(REF, REF) == 1.0
    assert headings_match("Sure, here is the doc: rotate the password and log in.", REF) == 0.0
    assert headings_match("anything", "a reference without headings") is None


def test_title_words_are_free_but_sections_are_exact_and_in_order():
    other_title = REF.replace("# Rotate the staging database password", "# Change the staging DB password")
    assert headings_match(other_title, REF) == 1.0  # the title is content; that there is one is format
    renamed = REF.replace("## Check it worked", "## Verification")
    assert headings_match(renamed, REF) == pytest.approx(4 / 5)
    wrong_level = REF.replace("## Steps", "### Steps")
    assert headings_match(wrong_level, REF) == pytest.approx(4 / 5)
    moved = REF.replace("## Before you start\n\n- Admin access.\n\n", "") + "\n## Before you start\n"
    assert headings_match(moved, REF) == pytest.approx(4 / 5)  # out of order: only the moved one is lost
    no_title = REF.split("\n", 1)[1]
    assert headings_match(no_title, REF) == pytest.approx(4 / 5)


def test_score_adds_headings_match_only_where_the_reference_has_headings():
    assert score(REF, REF)["headings_match"] == 1.0
    assert "headings_match" not in score('{"a": 1}', '{"a": 1}')


def test_average_over_the_rows_a_metric_applies_to():
    rows = [{"exact_match": 1.0, "headings_match": 0.5}, {"exact_match": 0.0}]
    assert average(rows) == {"exact_match": 0.5, "headings_match": 0.5}


def test_headings_match_can_be_the_primary_metric():
    from ft.config import EvalSettings
    from ft.eval.metrics import decide

    rule = EvalSettings(primary_metric="headings_match", min_improvement=0.2, guard_metrics=["eval_loss"])
    keep = decide({"headings_match": 0.3, "eval_loss": 1.9}, {"headings_match": 0.95, "eval_loss": 1.2}, rule)
    assert keep.verdict == "KEEP" and keep.reasons[0].startswith("primary headings_match: base 0.3000")
    not_docs = decide({"eval_loss": 1.9}, {"eval_loss": 1.2}, rule)  # no reference had headings
    assert not_docs.verdict == "DISCARD"
    assert "headings_match: not measured on this data" in " ".join(not_docs.reasons)
