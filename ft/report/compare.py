"""`ft report A B`: two runs or bundles side by side (recipe differences, metric deltas, curves overlaid).

The question after every second run is "what did I change, and did it help?": the page answers it with
the settings that differ (output paths and descriptions left out), the metrics of both with B - A, and
both runs' curves on the same axes.
"""

from __future__ import annotations

from typing import Any

from ft.report import charts
from ft.report.eval_report import METRIC_LABELS
from ft.report.html import chart, environment, metric_rows, series

# Settings that differ between any two runs without changing what was trained or how it was judged.
IGNORED = ("output.", "description")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def recipe_differences(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    fa, fb = flatten(a), flatten(b)
    return [
        {"key": k, "a": fa.get(k, "(unset)"), "b": fb.get(k, "(unset)")}
        for k in sorted(set(fa) | set(fb))
        if fa.get(k) != fb.get(k) and not k.startswith(IGNORED)
    ]


def metric_deltas(ra: dict[str, Any] | None, rb: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Tuned (and base) metrics of A and B with B - A; "better" by the metric's own direction."""
    from ft.eval.metrics import improvement

    def metrics(r, side):
        return ((r or {}).get("metrics") or {}).get(side) or {}

    ta, tb = metrics(ra, "tuned"), metrics(rb, "tuned")
    rows = []
    for m in [*ta, *(m for m in tb if m not in ta)]:
        a, b = ta.get(m), tb.get(m)
        both = isinstance(a, int | float) and isinstance(b, int | float)
        rows.append(
            {
                "name": METRIC_LABELS.get(m, m),
                "base_a": metrics(ra, "base").get(m),
                "base_b": metrics(rb, "base").get(m),
                "a": a,
                "b": b,
                "delta": b - a if both else None,
                "better": None if not both or round(b - a, 6) == 0 else improvement(m, a, b) > 0,
            }
        )
    return rows


def overlay_charts(ma: list[dict], mb: list[dict], la: str, lb: str) -> list[dict[str, Any]]:
    def both(kind, key, what):
        return [(f"{la} {what}", *series(ma, kind, key)), (f"{lb} {what}", *series(mb, kind, key))]

    none = "Neither run logged this in metrics.jsonl."
    return [
        chart(
            "Training loss",
            charts.line_chart(
                both("train", "loss", "train"),
                title="train loss",
                xlabel="optimizer step",
                ylabel="loss",
                styles=["-", "-"],
            ),
            none,
        ),
        chart(
            "Eval loss",
            charts.line_chart(
                both("eval", "eval_loss", "eval"),
                title="eval loss",
                xlabel="optimizer step",
                ylabel="loss",
                styles=["o-", "s-"],
            ),
            none,
        ),
        chart(
            "Learning rate",
            charts.line_chart(
                both("train", "learning_rate", "lr"),
                title="learning rate",
                xlabel="optimizer step",
                ylabel="learning rate",
                styles=["-", "-"],
            ),
            none,
        ),
        chart(
            "Throughput",
            charts.line_chart(
                both("train", "tokens_per_s", "tokens/s"),
                title="training throughput",
                xlabel="optimizer step",
                ylabel="tokens/s",
                styles=["-", "-"],
            ),
            none,
        ),
    ]


def compare_context(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    def side(src, tag):
        report = src["eval"] if isinstance(src["eval"], dict) else None
        return {
            "tag": tag,
            "name": str(src["run"].get("name") or src["dir"].name),
            "recipe": src["recipe"].get("name"),
            "model": (src["recipe"].get("model") or {}).get("name_or_path"),
            "verdict": ((report or {}).get("decision") or {}).get("verdict"),
            "reasons": ((report or {}).get("decision") or {}).get("reasons") or [],
            "examples": (report or {}).get("examples"),
            "rows": metric_rows(report) if report else [],
            "created": src["run"].get("created"),
        }

    return {
        "a": side(a, "A"),
        "b": side(b, "B"),
        "differences": recipe_differences(a["recipe"], b["recipe"]),
        "deltas": metric_deltas(a["eval"], b["eval"]),
        "charts": overlay_charts(a["metrics"], b["metrics"], "A", "B"),
    }


def render_compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    return environment().get_template("compare.html").render(**compare_context(a, b))
