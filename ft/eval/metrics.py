"""Scores for one prediction against its reference, their averages, and the keep/discard rule.

Pure functions on strings and numbers, so every rule here is unit-tested without a model.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ft.config import LOWER_IS_BETTER
from ft.eval.format_checks import headings_match

_WS = re.compile(r"\s+")
_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)
# Hermes / Qwen2.5 / ChatML tool templates wrap each call; an answer cut off at max_new_tokens may lack the
# closing tag.
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def normalise(text: str) -> str:
    return _WS.sub(" ", text.strip())


def exact_match(pred: str, ref: str) -> float:
    return float(normalise(pred) == normalise(ref))


def token_f1(pred: str, ref: str) -> float:
    """Harmonic mean of token precision and recall (words and punctuation, case-folded)."""
    p, r = _TOKEN.findall(pred.casefold()), _TOKEN.findall(ref.casefold())
    if not p and not r:
        return 1.0
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def parse_json(text: str) -> Any | None:
    """The prediction as JSON, tolerating surrounding whitespace and a ```json fence; None if invalid."""
    s = text.strip()
    if s.startswith("```"):
        s = s.strip("`").removeprefix("json").strip()
    try:
        return json.loads(s)
    except ValueError:
        return None


def schema_valid(parsed: Any, validator) -> float:
    return float(parsed is not None and validator is not None and not any(validator.iter_errors(parsed)))


def label_of(parsed: Any, text: str, label_field: str) -> str | None:
    if isinstance(parsed, dict) and label_field in parsed:
        return str(parsed[label_field])
    return None


def parse_tool_calls(text: str) -> list[dict[str, Any]] | None:
    """The `{"name", "arguments"}` calls in a generated answer, or None when it holds no readable call.

    Read from `<tool_call>{...}</tool_call>` blocks (Qwen2.5, Hermes and other ChatML tool templates),
    else from the whole answer as a bare JSON call: `{"name", "arguments"}` (or `"parameters"`, Llama
    3.1's key), OpenAI's `{"type": "function", "function": {...}}`, or an array of calls. Arguments given
    as a JSON string are parsed. One unreadable block makes the answer unreadable: a half-right set of
    calls is not a right one."""
    blocks = _TOOL_CALL.findall(text)
    calls: list[dict[str, Any]] = []
    for block in blocks or [text]:
        parsed = parse_json(block)
        items = parsed if isinstance(parsed, list) else [parsed]
        for item in items:
            call = _as_call(item)
            if call is None:
                return None
            calls.append(call)
    return calls or None


def _as_call(item: Any) -> dict[str, Any] | None:
    if isinstance(item, dict) and isinstance(item.get("function"), dict):
        item = item["function"]
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    args = item.get("arguments", item.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {"name": item["name"], "arguments": args}


def _canonical(call: dict[str, Any]) -> str:
    return json.dumps(call, sort_keys=True, ensure_ascii=False)


def tool_call_scores(pred: str, ref_calls: list[dict[str, Any]]) -> dict[str, float]:
    """`tool_call_exact`: the answer makes the reference's calls (names exact, arguments equal as parsed
    JSON; parallel calls in any order); `tool_name_match`: it calls the same functions, whatever the
    arguments."""
    calls = parse_tool_calls(pred) or []
    names = sorted(c["name"] for c in calls)
    return {
        "tool_call_exact": float(sorted(map(_canonical, calls)) == sorted(map(_canonical, ref_calls))),
        "tool_name_match": float(names == sorted(c["name"] for c in ref_calls)),
    }


def score(
    pred: str,
    ref: str,
    *,
    validator=None,
    label_field: str | None = None,
    ref_calls: list[dict[str, Any]] | None = None,
) -> dict[str, float]:
    """The scores of one answer; `ref_calls` (the reference's tool calls) adds the tool-call metrics."""
    parsed = parse_json(pred)
    scores = {
        "exact_match": exact_match(pred, ref),
        "token_f1": token_f1(pred, ref),
        "json_valid": float(parsed is not None),
    }
    if validator is not None:
        scores["schema_valid"] = schema_valid(parsed, validator)
    if label_field:
        ref_label = label_of(parse_json(ref), ref, label_field)
        scores["label_accuracy"] = float(
            ref_label is not None and label_of(parsed, pred, label_field) == ref_label
        )
    if ref_calls:
        scores.update(tool_call_scores(pred, ref_calls))
    outline = headings_match(pred, ref)  # only where the reference is a Markdown document with headings
    if outline is not None:
        scores["headings_match"] = outline
    return scores


def average(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the rows that have it (tool-call metrics exist only where the reference
    is a tool call)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = {}
    for k in keys:
        values = [r[k] for r in rows if k in r]
        out[k] = round(sum(values) / len(values), 6)
    return out


@dataclass
class Decision:
    verdict: str
    reasons: list[str] = field(default_factory=list)
    deltas: dict[str, float] = field(default_factory=dict)
    # eval.benchmarks scores with their relative change and check (report.json's "benchmarks").
    benchmarks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "reasons": self.reasons, "deltas": self.deltas}


def improvement(metric: str, base: float, tuned: float) -> float:
    """Signed improvement: positive is better, whichever direction the metric runs."""
    return base - tuned if metric in LOWER_IS_BETTER else tuned - base


def _direction(metric: str) -> str:
    return " (lower is better)" if metric in LOWER_IS_BETTER else ""


def _moved(delta: float) -> str:
    """A signed improvement in words, so a falling loss never reads as a rise."""
    if round(delta, 4) == 0:
        return "unchanged"
    return f"{'improved' if delta > 0 else 'worsened'} by {abs(delta):.4f}"


def benchmark_check(score: dict[str, Any], max_drop: float) -> dict[str, Any]:
    """One benchmark's score with `relative_change` ((tuned - base) / |base|, None when base is 0) and
    `ok`: it does not worsen by more than `max_drop` of the base score (relative)."""
    base, tuned = score["base"], score["tuned"]
    better = score.get("higher_is_better", True)
    worse_by = (base - tuned) if better else (tuned - base)
    rel = None if base == 0 else round((tuned - base) / abs(base), 6)
    ok = worse_by <= 0 if base == 0 else worse_by / abs(base) <= max_drop + 1e-12
    return {**score, "relative_change": rel, "ok": bool(ok)}


def decide(
    base: dict[str, float],
    tuned: dict[str, float],
    eval_settings,
    benchmarks: dict[str, dict[str, Any]] | None = None,
) -> Decision:
    """KEEP when the primary metric improves by at least `min_improvement`, no guard metric gets
    worse by more than `max_regression` and no benchmark (eval.benchmarks: {task: {metric, base, tuned,
    higher_is_better}}) drops by more than `max_benchmark_drop` relative; otherwise DISCARD. Every check
    contributes a reason."""
    e = eval_settings
    reasons, deltas, keep = [], {}, True
    for metric in [e.primary_metric, *e.guard_metrics]:
        if metric not in base or metric not in tuned:
            reasons.append(f"{metric}: not measured on this data, so it cannot support KEEP")
            keep = keep and metric != e.primary_metric
            continue
        deltas[metric] = round(improvement(metric, base[metric], tuned[metric]), 6)
    p = e.primary_metric
    if p in deltas:
        ok = deltas[p] >= e.min_improvement
        keep &= ok
        reasons.insert(
            0,
            f"primary {p}{_direction(p)}: base {base[p]:.4f} -> tuned {tuned[p]:.4f} ({_moved(deltas[p])}, "
            f"needs to improve by at least {e.min_improvement:.4f}) {'ok' if ok else 'FAILS'}",
        )
    for g in e.guard_metrics:
        if g in deltas:
            ok = deltas[g] >= -e.max_regression
            keep &= ok
            reasons.append(
                f"guard {g}{_direction(g)}: base {base[g]:.4f} -> tuned {tuned[g]:.4f} ({_moved(deltas[g])}, "
                f"may worsen by at most {e.max_regression:.4f}) {'ok' if ok else 'FAILS'}"
            )
    checked = {}
    for task, score in (benchmarks or {}).items():
        c = checked[task] = benchmark_check(score, e.max_benchmark_drop)
        keep &= c["ok"]
        rel = "base is 0" if c["relative_change"] is None else f"{c['relative_change']:+.1%}"
        lower = "" if c.get("higher_is_better", True) else ", lower is better"
        reasons.append(
            f"benchmark {task} {c['metric']}{lower}: base {c['base']:.4f} -> tuned {c['tuned']:.4f} ({rel}, "
            f"may drop by at most {e.max_benchmark_drop * 100:g}% relative) {'ok' if c['ok'] else 'FAILS'}"
        )
    return Decision("KEEP" if keep else "DISCARD", reasons, deltas, checked)
