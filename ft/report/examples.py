"""What the answers look like: worst and best examples with differences marked, per-label accuracy and
the confusion matrix. Pure functions on eval/predictions.jsonl rows; the template does all escaping."""

from __future__ import annotations

import difflib
import re
from collections import Counter
from typing import Any

from ft.eval.metrics import label_of, parse_json

_PIECES = re.compile(r"\s+|\w+|[^\w\s]", re.UNICODE)
NO_LABEL = "(no label)"  # the answer was not JSON, or had no such field


def diff_segments(reference: str, answer: str) -> list[tuple[str, str]]:
    """`answer` cut into (kind, text) pieces, kind "same" or "diff" against `reference` (word level)."""
    ref, ans = _PIECES.findall(reference), _PIECES.findall(answer)
    out: list[tuple[str, str]] = []
    for op, _i1, _i2, j1, j2 in difflib.SequenceMatcher(None, ref, ans, autojunk=False).get_opcodes():
        if j1 == j2:
            continue
        kind = "same" if op == "equal" else "diff"
        text = "".join(ans[j1:j2])
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))
    return out


def _key(p: dict[str, Any], primary: str) -> tuple[float, float]:
    s = p.get("tuned_scores") or {}
    return (float(s.get(primary, 0.0)), float(s.get("token_f1", 0.0)))


def worst_and_best(
    predictions: list[dict[str, Any]], primary: str, n: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The n rows the tuned model did worst and best on (primary metric, then token F1), never overlapping."""
    ordered = sorted(predictions, key=lambda p: _key(p, primary))
    worst = ordered[: min(n, len(ordered))]
    best = list(reversed(ordered[len(worst) :]))[:n]
    return [example_view(p, primary) for p in worst], [example_view(p, primary) for p in best]


def example_view(p: dict[str, Any], primary: str) -> dict[str, Any]:
    ref = str(p.get("reference", ""))
    return {
        "id": str(p.get("id", "")),
        "prompt": str(p.get("prompt", "")),
        "reference": ref,
        "base": diff_segments(ref, str(p.get("base", ""))),
        "tuned": diff_segments(ref, str(p.get("tuned", ""))),
        "base_score": (p.get("base_scores") or {}).get(primary),
        "tuned_score": (p.get("tuned_scores") or {}).get(primary),
    }


def label_views(predictions: list[dict[str, Any]], field: str, declared: list[str] | None) -> dict[str, Any]:
    """Per-label accuracy (base and tuned) and the tuned model's confusion matrix (rows: reference)."""
    pairs = []
    for p in predictions:
        ref = label_of(parse_json(str(p.get("reference", ""))), "", field)
        if ref is None:
            continue
        base = label_of(parse_json(str(p.get("base", ""))), "", field) or NO_LABEL
        tuned = label_of(parse_json(str(p.get("tuned", ""))), "", field) or NO_LABEL
        pairs.append((ref, base, tuned))
    refs = Counter(r for r, _, _ in pairs)
    labels = [x for x in declared or [] if x in refs] + sorted(x for x in refs if x not in (declared or []))
    predicted = {t for _, _, t in pairs}
    columns = labels + sorted(x for x in predicted if x not in labels and x != NO_LABEL)
    if NO_LABEL in predicted:
        columns.append(NO_LABEL)
    cells = Counter((r, t) for r, _, t in pairs)
    rows = []
    for label in labels:
        n = refs[label]
        rows.append(
            {
                "label": label,
                "count": n,
                "base": sum(1 for r, b, _ in pairs if r == label and b == label) / n,
                "tuned": cells[(label, label)] / n,
                "cells": [cells[(label, c)] for c in columns],
            }
        )
    return {"field": field, "columns": columns, "rows": rows, "examples": len(pairs)}
