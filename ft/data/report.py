"""The data report: `build_report` assembles the run's data.json, `render_report` shows it to people."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)
FIRST = 5  # locations kept per reason


@dataclass
class Tally:
    """A count with its first few locations."""

    count: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, where: str) -> None:
        self.count += 1
        if len(self.first) < FIRST:
            self.first.append(where)

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "first": self.first}


@dataclass
class Tallies:
    """What the check found and did, reason by reason."""

    duplicates: Tally = field(default_factory=Tally)  # found (dropped only under data.duplicates=drop)
    leakage: Tally = field(default_factory=Tally)
    over: Tally = field(default_factory=Tally)  # rows over train.max_seq_length, whatever the policy
    too_long: Tally = field(default_factory=Tally)  # dropped for length
    prompt_fills_window: Tally = field(
        default_factory=Tally
    )  # dropped under truncate: no room for the answer


@dataclass
class ToolCounts:
    """Rows that define tools, rows whose assistant calls tools (and how many calls), rows with reasoning."""

    with_tools: int = 0
    with_tool_calls: int = 0
    tool_calls: int = 0
    with_reasoning: int = 0

    def count(self, tools: list[Any] | None, messages: list[dict[str, Any]]) -> None:
        calls = sum(len(m.get("tool_calls") or ()) for m in messages)
        self.with_tools += bool(tools)
        self.with_tool_calls += bool(calls)
        self.tool_calls += calls
        self.with_reasoning += any("reasoning_content" in m for m in messages)

    def to_dict(self) -> dict[str, int]:
        return {
            "rows_with_tools": self.with_tools,
            "rows_with_tool_calls": self.with_tool_calls,
            "tool_calls": self.tool_calls,
            "rows_with_reasoning": self.with_reasoning,
        }


def build_report(
    settings: Any,
    tokenizer: Any,
    files: list[Any],
    counts: dict[str, Any],
    tallies: Tallies,
    lengths: list[int],
    train: list[Any],
    held: list[Any],
) -> dict[str, Any]:
    """The data manifest (JSON-able): files and hashes, shapes, drops, lengths, labels and the split."""
    d = settings.data
    split: dict[str, Any] = (
        {"method": "eval files"}
        if d.eval
        else {
            "method": "seeded",
            "seed": d.split_seed,
            "eval_fraction": d.eval_fraction,
            "eval_max_rows": d.eval_max_rows,
        }
    )
    split.update(
        train_size=len(train),
        eval_size=len(held),
        train_ids=[ex.id for ex in train],
        eval_ids=[ex.id for ex in held],
    )
    dropped_duplicates = tallies.duplicates if d.duplicates == "drop" else Tally()
    return {
        "format": "ft-data/1",
        "tokenizer": tokenizer_facts(settings, tokenizer),
        "files": [f.to_dict() for f in files],
        "rows": {"read": counts["read"], "train": len(train), "eval": len(held)},
        "shapes": dict(counts["shapes"].most_common()),
        "system_prompt_added": counts["system_prompt_added"],
        "tools": {
            **counts.get("tools", ToolCounts().to_dict()),
            "reasoning_policy": getattr(d, "reasoning", "keep"),
        },
        "duplicates": {"policy": d.duplicates, **tallies.duplicates.to_dict()},
        "dropped": {
            "duplicate": dropped_duplicates.to_dict(),
            "too_long": tallies.too_long.to_dict(),
            "prompt_fills_window": tallies.prompt_fills_window.to_dict(),
        },
        "tokens": token_stats(lengths),
        "too_long": {
            "max_seq_length": settings.train.max_seq_length,
            "policy": d.too_long,
            **tallies.over.to_dict(),
        },
        "leakage": {"checked": bool(d.eval), **tallies.leakage.to_dict()},
        "labels": label_report(d, train, held),
        "split": split,
    }


def label_report(d: Any, train: list[Any], held: list[Any]) -> dict[str, Any] | None:
    if not d.label_field:
        return None
    train_counts = Counter(ex.label for ex in train)
    report = {
        "field": d.label_field,
        "declared": d.labels,
        "train": dict(train_counts.most_common()),
        "eval": dict(Counter(ex.label for ex in held).most_common()),
    }
    if d.labels is not None:
        report["missing_from_train"] = [label for label in d.labels if label not in train_counts]
    return report


def tokenizer_facts(settings: Any, tokenizer: Any) -> dict[str, Any]:
    """Enough to tell whether two checks measured with the same tokenizer and chat template."""
    from ft.data import chat_templates

    template = chat_templates.facts(tokenizer, getattr(settings.data, "chat_template", None))
    return {
        "name": settings.model.name_or_path,
        "revision": settings.model.revision,
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "chat_template_sha256": template["sha256"],
        "chat_template": template,  # data.chat_template: source (tokenizer/named/file), name, sha256, EOS
    }


def _template_line(t: dict[str, Any]) -> str:
    which = {
        "tokenizer": "the tokenizer's own",
        "named": f"built-in {t['name']}",
        "file": f"file {t['name']}",
    }
    return f"{which.get(t['source'], t['source'])} (data.chat_template), sha256 {(t['sha256'] or '-')[:12]}"


def token_stats(lengths: list[int]) -> dict[str, Any]:
    """min, mean, p50/p90/p99 (nearest rank) and max of the token lengths, their total and histogram."""
    if not lengths:
        return {
            **{"rows": 0, "total": 0, "min": 0, "mean": 0.0, "p50": 0, "p90": 0, "p99": 0, "max": 0},
            "histogram": {"edges": [], "counts": []},
        }
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
    stats["histogram"] = length_histogram(ordered)
    return stats


def length_histogram(ordered: list[int], bins: int = 24) -> dict[str, list[int]]:
    """Counts of sorted token lengths in up to `bins` equal integer-width bins (report.html draws it)."""
    lo, hi = ordered[0], ordered[-1]
    width = max(1, math.ceil((hi - lo + 1) / bins))
    counts = [0] * ((hi - lo) // width + 1)
    for n in ordered:
        counts[(n - lo) // width] += 1
    edges = [lo + i * width for i in range(len(counts) + 1)]
    return {"edges": edges, "counts": counts}


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


def _first(tally: dict[str, Any], shown: int = 2) -> str:
    if not tally["count"]:
        return "none"
    more = ", ..." if tally["count"] > shown else ""
    return f"{tally['count']}: {', '.join(tally['first'][:shown])}{more}"


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
        if f.get("source") == "huggingface-hub":  # size and sha256 are those of the rows as JSON Lines
            revision = (f.get("revision") or "unknown")[:12]
            lines.append(
                f"  {'':{width}}  Hub split {f['split']}, revision {revision}, fingerprint {f['fingerprint']}"
            )
    lines.append("")
    tok, t = report["tokenizer"], report["tokens"]
    too_long, dup, leak = report["too_long"], report["duplicates"], report["leakage"]
    dropped = {reason: tally["count"] for reason, tally in report["dropped"].items() if tally["count"]}
    table = [
        ("shapes", _counts(report["shapes"])),
        ("tokenizer", f"{tok['name']} ({tok['class']}, vocab {tok['vocab_size']})"),
        *([("template", _template_line(tok["chat_template"]))] if tok.get("chat_template") else []),
        (
            "tokens",
            f"min {t['min']}  mean {t['mean']}  p50 {t['p50']}  p90 {t['p90']}  p99 {t['p99']}  "
            f"max {t['max']}  (total {t['total']:,})"
            + (f"; {t['partly_counted']} over-long counted in part" if t.get("partly_counted") else ""),
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
    tools = report.get("tools") or {}
    if tools.get("rows_with_tools") or tools.get("rows_with_tool_calls"):
        table.append(
            (
                "tools",
                f"{tools['rows_with_tools']} rows define tools; "
                f"{tools['rows_with_tool_calls']} rows call them ({tools['tool_calls']} calls)",
            )
        )
    if tools.get("rows_with_reasoning"):
        table.append(
            (
                "reasoning",
                f"{tools['rows_with_reasoning']} rows (data.reasoning: {tools.get('reasoning_policy')})",
            )
        )
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
    lines += [f"warning: {text}" for text in report.get("warnings", [])]
    return "\n".join(lines)
