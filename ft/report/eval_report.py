"""What people read and look at: report.md, the loss curve, decision.md.

Every file written here names the environment manifest it came from (path and sha256), so any figure
can be traced back to the machine, packages and data that produced it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ft.errors import FtError
from ft.fsutil import write_bytes, write_json, write_text

METRIC_LABELS = {
    "exact_match": "exact match",
    "token_f1": "token F1",
    "json_valid": "valid JSON",
    "schema_valid": "schema-valid",
    "label_accuracy": "label accuracy",
    "tool_call_exact": "tool call exact",
    "tool_name_match": "tool name match",
    "headings_match": "headings match",
    "eval_loss": "eval loss (lower is better)",
}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a kill is skipped, not fatal
            continue
    return rows


def plot_loss(metrics: list[dict[str, Any]], out: Path, title: str) -> Path | None:
    train = [
        (r["step"], r["loss"]) for r in metrics if r.get("kind") == "train" and r.get("loss") is not None
    ]
    evals = [(r["step"], r["eval_loss"]) for r in metrics if r.get("kind") == "eval"]
    if not train:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*train, strict=True), label="train loss", color="#1f77b4", linewidth=1.5)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", color="#d62728")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    # A fixed creation date keeps the PNG byte-identical across identical runs.
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return write_bytes(out, buf.getvalue())


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _clip(text: str, n: int = 160) -> str:
    text = text.replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


def worst_examples(predictions: list[dict[str, Any]], primary: str, n: int) -> list[dict[str, Any]]:
    """The held-out rows the tuned model did worst on (primary metric, then token F1)."""

    def key(p):
        s = p["tuned_scores"]
        return (s.get(primary, 0.0), s.get("token_f1", 0.0))

    return sorted(predictions, key=key)[:n]


def render_markdown(
    report: dict[str, Any], predictions: list[dict[str, Any]], settings, env_ref: dict[str, str]
) -> str:
    base, tuned = report["metrics"]["base"], report["metrics"]["tuned"]
    d = report["decision"]
    lines = [
        f"# Evaluation: {settings.name}",
        "",
        f"**Verdict: {d['verdict']}** — base `{settings.model.name_or_path}` vs base + LoRA adapter on "
        f"{report['examples']} held-out prompts (greedy, max {report['generation']['max_new_tokens']} new tokens).",
        "",
        "| metric | base | tuned | change |",
        "|---|---:|---:|---:|",
    ]
    for metric in base:
        change = tuned[metric] - base[metric]
        lines.append(
            f"| {METRIC_LABELS.get(metric, metric)} | {_fmt(base[metric])} | {_fmt(tuned[metric])} | {change:+.4f} |"
        )
    lines += benchmark_lines(report)
    lines += ["", "## Decision", ""] + [f"- {r}" for r in d["reasons"]]
    worst = worst_examples(predictions, report["rule"]["primary_metric"], settings.eval.worst_examples)
    if worst:
        lines += [
            "",
            f"## The {len(worst)} worst examples (tuned)",
            "",
            "| id | reference | base | tuned |",
            "|---|---|---|---|",
        ]
        for p in worst:
            lines.append(
                f"| `{p['id']}` | {_clip(p['reference'])} | {_clip(p['base'])} | {_clip(p['tuned'])} |"
            )
    lines += [
        "",
        "![loss curve](loss.png)",
        "",
        f"Environment: `{env_ref['path']}` (sha256 `{env_ref['sha256']}`).",
        "",
    ]
    return "\n".join(lines)


def benchmark_lines(report: dict[str, Any]) -> list[str]:
    """The forgetting check's table (eval.benchmarks), or nothing when no benchmark ran."""
    bench = report.get("benchmarks")
    if not bench:
        return []
    h = report.get("benchmark_harness") or {}
    lines = [
        "",
        "## General benchmarks (forgetting check)",
        "",
        f"lm-evaluation-harness {h.get('lm_eval_version', '')}, limit {h.get('limit')}; a score may drop by "
        f"at most {report['rule']['max_benchmark_drop'] * 100:g}% relative to the base's.",
        "",
        "| task | metric | base | tuned | relative change | check |",
        "|---|---|---:|---:|---:|---|",
    ]
    for task, b in bench.items():
        rel = "n/a" if b["relative_change"] is None else f"{b['relative_change']:+.1%}"
        lines.append(
            f"| {task} | {b['metric']} | {b['base']:.4f} | {b['tuned']:.4f} | {rel} | {'ok' if b['ok'] else 'FAILS'} |"
        )
    return lines


def render_decision(report: dict[str, Any], settings, env_ref: dict[str, str]) -> str:
    d = report["decision"]
    r = report["rule"]
    return "\n".join(
        [
            f"# {d['verdict']}: {settings.name}",
            "",
            f"Rule: `{r['primary_metric']}` must improve by at least {r['min_improvement']}; "
            f"no guard metric ({', '.join(r['guard_metrics']) or 'none'}) may get worse by more than {r['max_regression']} (in its own direction).",
            "",
            *[f"- {reason}" for reason in d["reasons"]],
            "",
            f"Details: eval/report.md. Environment: `env.json` (sha256 `{env_ref['sha256']}`).",
            "",
        ]
    )


def write_html(run_dir: Path, report: dict[str, Any], predictions: list[dict[str, Any]]) -> None:
    """eval/report.html; a page that fails to render costs a warning, never the evaluation."""
    import sys

    from ft.report.html import write_run_report

    try:
        write_run_report(run_dir, report=report, predictions=predictions)
    except FtError:  # a full disk or unwritable eval/ fails the evaluation, as for every other output
        raise
    except Exception as exc:  # noqa: BLE001 - a rendering bug must not cost the metrics; `ft report` can retry
        print(
            f"warning: eval/report.html not written ({type(exc).__name__}: {exc}); "
            f"rebuild it with `ft report {run_dir}`",
            file=sys.stderr,
        )


def write_eval_outputs(
    run_dir: Path, report: dict[str, Any], predictions: list[dict[str, Any]], settings, env_ref
) -> Path:
    """eval/ (report.json, report.md, report.html, predictions.jsonl, loss.png) and decision.md, each atomically."""
    eval_dir = run_dir / "eval"
    report = {**report, "env": env_ref}
    plot_loss(
        read_metrics(run_dir / "metrics.jsonl"), eval_dir / "loss.png", f"{settings.name}: training loss"
    )
    write_text(
        eval_dir / "predictions.jsonl",
        "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions),
    )
    write_text(eval_dir / "report.md", render_markdown(report, predictions, settings, env_ref))
    write_text(run_dir / "decision.md", render_decision(report, settings, env_ref))
    write_html(run_dir, report, predictions)
    write_json(eval_dir / "report.json", report)  # last: its presence marks the evaluation complete
    return eval_dir
