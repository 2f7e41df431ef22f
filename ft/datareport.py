"""The data report for people: `render_report(report)` turns the data.json dict into a short text table."""

from __future__ import annotations

import math
from typing import Any

PERCENTILES = (50, 90, 99)


def token_stats(lengths: list[int]) -> dict[str, Any]:
    """min, mean, p50/p90/p99 (nearest rank) and max of the token lengths, plus their total."""
    if not lengths:
        return {"rows": 0, "total": 0, "min": 0, "mean": 0.0, "p50": 0, "p90": 0, "p99": 0, "max": 0}
    ordered = sorted(lengths)
    n = len(ordered)
    stats: dict[str, Any] = {
        "rows": n,
        "total": sum(ordered),
        "min": ordered[0],
        "mean": round(sum(ordered) / n, 1),
    }
    for p in PERCENTILES:
        stats[f"p{p}"] = ordered[min(n - 1, max(0, math.ceil(p / 100 * n) - 1))]
    stats["max"] = ordered[-1]
    return stats


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _counts(counts: dict[str, int], limit: int = 8) -> str:
    items = list(counts.items())
    text = ", ".join(f"{k} {v}" for k, v in items[:limit])
    return text + (f", ... ({len(items) - limit} more)" if len(items) > limit else "") if items else "-"


def _first(tally: dict[str, Any]) -> str:
    if not tally["count"]:
        return "none"
    more = ", ..." if tally["count"] > len(tally["first"]) else ""
    return f"{tally['count']}: {', '.join(tally['first'])}{more}"


def render_report(report: dict[str, Any]) -> str:
    rows, files = report["rows"], report["files"]
    lines = [
        f"data check: {rows['read']} rows read from {len(files)} file(s); "
        f"{rows['train']} train + {rows['eval']} eval",
        "",
    ]
    width = max([len(f["name"]) for f in files] + [4])
    lines.append(f"  {'file':{width}}  role    {'rows':>7}  {'size':>9}  sha256")
    for f in files:
        lines.append(
            f"  {f['name']:{width}}  {f['role']:6}  {f['rows']:>7}  {_size(f['bytes']):>9}  {f['sha256'][:12]}"
        )
    lines.append("")
    tok, t = report["tokenizer"], report["tokens"]
    too_long, dup, leak = report["too_long"], report["duplicates"], report["leakage"]
    dropped = {reason: tally["count"] for reason, tally in report["dropped"].items() if tally["count"]}
    table = [
        ("shapes", _counts(report["shapes"])),
        ("tokenizer", f"{tok['name']} ({tok['class']}, vocab {tok['vocab_size']})"),
        (
            "tokens",
            f"min {t['min']}  mean {t['mean']}  p50 {t['p50']}  p90 {t['p90']}  p99 {t['p99']}  "
            f"max {t['max']}  (total {t['total']:,})",
        ),
        (
            "too long",
            f"{too_long['count']} over train.max_seq_length {too_long['max_seq_length']} "
            f"(data.too_long: {too_long['policy']})",
        ),
        ("duplicates", f"{_first(dup)} (data.duplicates: {dup['policy']})"),
        ("dropped", _counts(dropped) if dropped else "none"),
        (
            "leakage",
            _first(leak) if leak["checked"] else "none (the seeded split keeps each prompt on one side)",
        ),
    ]
    if report.get("system_prompt_added"):
        table.append(("system", f"data.system_prompt added to {report['system_prompt_added']} rows"))
    labels = report.get("labels")
    if labels:
        table.append(
            ("labels", f"{labels['field']}: train {_counts(labels['train'])}; eval {_counts(labels['eval'])}")
        )
        if labels.get("missing_from_train"):
            table.append(("", f"declared but absent from train: {', '.join(labels['missing_from_train'])}"))
    split = report["split"]
    how = f"seeded (seed {split['seed']})" if split["method"] == "seeded" else "from data.eval files"
    table.append(("split", f"{how}: train {split['train_size']}, eval {split['eval_size']}"))
    lines += [f"  {key:11} {value}" for key, value in table]
    return "\n".join(lines)
