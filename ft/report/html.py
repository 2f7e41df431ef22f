"""report.html: one self-contained page per run (no network, no script), rendered with Jinja2.

Everything shown comes from the run's own files (metrics.jsonl, eval/, data.json, env.json, run.json,
recipe.resolved.yaml), so a bundle renders the same page as the run it was sealed from. Autoescaping is
on: prompts and answers are data, and a hostile one renders as text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ft.errors import FtError
from ft.fsutil import write_text
from ft.report import charts
from ft.report.eval_report import METRIC_LABELS, read_metrics
from ft.report.examples import label_views, worst_and_best

GIB = 1024**3
KEY_PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "unsloth")


def environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=PackageLoader("ft.report", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = fmt_number
    env.filters["signed"] = lambda v: "-" if v is None else f"{v:+.4f}"
    return env


def fmt_number(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, float):
        return str(v)
    return f"{v:.{digits}f}" if abs(v) >= 10**-digits or v == 0 else f"{v:.2e}"


# ------------------------------------------------------------------------------------------ reading
def read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise FtError(f"{path}: cannot read it as JSON ({exc})") from None


def read_recipe(run_dir: Path) -> dict[str, Any]:
    import yaml

    path = run_dir / "recipe.resolved.yaml"
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, yaml.YAMLError, RecursionError) as exc:
        raise FtError(f"{path}: cannot read the resolved recipe ({exc})") from None
    return recipe if isinstance(recipe, dict) else {}


def read_predictions(path: Path) -> list[dict[str, Any]]:
    rows = []
    for row in read_metrics(path):  # the same tolerant JSON-lines reader
        if isinstance(row, dict):
            rows.append(row)
    return rows


def load_run(
    run_dir: Path, *, report: dict[str, Any] | None = None, predictions: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Every file the page is made from, read once; missing optional files are None/empty.

    `report`/`predictions`: the evaluation in memory, for the page written before eval/report.json
    (whose presence marks the evaluation complete, so it is written last).
    """
    run_dir = Path(run_dir)
    run = read_json(run_dir / "run.json")
    if not isinstance(run, dict):
        raise FtError(f"{run_dir}: not an ft run or bundle (no run.json)")
    return {
        "dir": run_dir,
        "run": run,
        "recipe": read_recipe(run_dir),
        "metrics": [r for r in read_metrics(run_dir / "metrics.jsonl") if isinstance(r, dict)],
        "eval": report if report is not None else read_json(run_dir / "eval" / "report.json"),
        "predictions": predictions
        if predictions is not None
        else read_predictions(run_dir / "eval" / "predictions.jsonl"),
        "data": read_json(run_dir / "data.json") or {},
        "env": read_json(run_dir / "env.json") or {},
    }


def _section(recipe: dict[str, Any], name: str) -> dict[str, Any]:
    value = recipe.get(name)
    return value if isinstance(value, dict) else {}


# ------------------------------------------------------------------------------------------ charts
def series(metrics: list[dict[str, Any]], kind: str, key: str, scale: float = 1.0):
    pts = [
        (r["step"], r[key] / scale)
        for r in metrics
        if r.get("kind") == kind and isinstance(r.get(key), int | float) and isinstance(r.get("step"), int)
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


def chart(title: str, svg: str | None, note: str) -> dict[str, Any]:
    return {"title": title, "svg": svg, "note": None if svg else note}


def run_charts(metrics: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    train, evals = series(metrics, "train", "loss"), series(metrics, "eval", "eval_loss")
    mem, peak = (
        series(metrics, "train", "gpu_memory_bytes", GIB),
        series(metrics, "train", "gpu_peak_bytes", GIB),
    )
    no_rows = "No training steps logged in metrics.jsonl."
    return [
        chart(
            "Loss",
            charts.line_chart(
                [("train loss", *train), ("eval loss", *evals)],
                title=f"{name}: loss",
                xlabel="optimizer step",
                ylabel="loss (assistant tokens)",
                styles=["-", "o-"],
            ),
            no_rows,
        ),
        chart(
            "Learning rate",
            charts.line_chart(
                [("", *series(metrics, "train", "learning_rate"))],
                title="learning rate",
                xlabel="optimizer step",
                ylabel="learning rate",
            ),
            no_rows,
        ),
        chart(
            "Throughput",
            charts.line_chart(
                [("", *series(metrics, "train", "tokens_per_s"))],
                title="training throughput",
                xlabel="optimizer step",
                ylabel="tokens/s",
            ),
            "No throughput in metrics.jsonl.",
        ),
        chart(
            "GPU memory",
            charts.line_chart(
                [("allocated", *mem), ("peak so far", *peak)],
                title="GPU memory",
                xlabel="optimizer step",
                ylabel="GiB",
            ),
            "No GPU memory in metrics.jsonl: a CPU run, or one from before ft logged it.",
        ),
    ]


# ------------------------------------------------------------------------------------------ sections
def metric_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    from ft.eval.metrics import improvement

    base = (report.get("metrics") or {}).get("base") or {}
    tuned = (report.get("metrics") or {}).get("tuned") or {}
    rule = report.get("rule") or {}
    rows = []
    for metric in [*base, *(m for m in tuned if m not in base)]:
        b, t = base.get(metric), tuned.get(metric)
        both = isinstance(b, int | float) and isinstance(t, int | float)
        rows.append(
            {
                "name": METRIC_LABELS.get(metric, metric),
                "role": "primary"
                if metric == rule.get("primary_metric")
                else ("guard" if metric in (rule.get("guard_metrics") or []) else ""),
                "base": b,
                "tuned": t,
                "change": t - b if both else None,
                "better": None if not both or round(t - b, 6) == 0 else improvement(metric, b, t) > 0,
            }
        )
    return rows


def data_view(data: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
    tokens = data.get("tokens") or {}
    limit = _section(recipe, "train").get("max_seq_length")
    hist = tokens.get("histogram") or {}
    svg = charts.histogram(
        hist.get("edges") or [],
        hist.get("counts") or [],
        title="tokens per row",
        xlabel="tokens",
        limit=limit,
    )
    if svg is None and tokens.get("rows"):
        # Runs from before data.json kept a histogram: the percentiles it did keep, on the same axis.
        keys = [k for k in ("min", "p50", "p90", "p99", "max") if isinstance(tokens.get(k), int | float)]
        svg = charts.bar_chart(
            keys, [("tokens", [tokens[k] for k in keys])], title="tokens per row", ylabel="tokens"
        )
    drops = {
        reason: (v.get("count") if isinstance(v, dict) else v)
        for reason, v in (data.get("dropped") or {}).items()
    }
    return {
        "files": data.get("files") or [],
        "rows": data.get("rows") or {},
        "shapes": data.get("shapes") or {},
        "drops": drops,
        "tokens": tokens,
        "limit": limit,
        "length_chart": svg,
        "labels": data.get("labels"),
        "warnings": data.get("warnings") or [],
        "split": {k: v for k, v in (data.get("split") or {}).items() if not k.endswith("_ids")},
    }


def env_view(env: dict[str, Any]) -> dict[str, Any]:
    from ft.manifest import lock_summary

    gpu = env.get("gpu") or {}
    packages = env.get("packages") or {}
    image = env.get("image") or {}
    lockfile = env.get("lockfile") or {}
    return {
        "gpus": ", ".join(str(d.get("name", "?")) for d in gpu.get("devices") or []) or "none (CPU)",
        "driver": gpu.get("driver"),
        "cuda": gpu.get("cuda_runtime"),
        "cudnn": gpu.get("cudnn"),
        "python": env.get("python"),
        "os": env.get("os"),
        "packages": [(name, packages.get(name)) for name in KEY_PACKAGES if packages.get(name)],
        "image": image.get("id") if isinstance(image, dict) else image,
        "commit": env.get("git_commit"),
        "lockfile": lockfile.get("name"),
        "lockfile_sha256": lockfile.get("sha256"),
        "lock": lock_summary(env.get("lock")) or "unknown (no lockfile)",
        "captured": env.get("captured"),
    }


def sizing_view(run_dir: Path, env: dict[str, Any], metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """`ft size`'s predicted peak for the GPU and micro-batch the run used, beside the measured peak."""
    measured = [r["gpu_peak_bytes"] for r in metrics if isinstance(r.get("gpu_peak_bytes"), int | float)]
    devices = (env.get("gpu") or {}).get("devices") or []
    view: dict[str, Any] = {
        "predicted_gib": None,
        "measured_gib": max(measured) / GIB if measured else None,
        "gpu": None,
        "micro_batch": None,
        "note": None,
    }
    if not devices:
        view["note"] = "Trained without a CUDA GPU: no memory prediction or measurement applies."
        return view
    micro = (env.get("run") or {}).get("micro_batch")
    try:
        from ft.pipeline import settings_of_run
        from ft.sizing import size_report

        name = str(devices[0].get("name"))
        report = size_report(settings_of_run(run_dir), gpu=name, micro_batch=micro)
        view["predicted_gib"] = report.estimate.peak_allocated_bytes / GIB
        view["gpu"] = name
        view["micro_batch"] = micro
    except Exception as exc:  # noqa: BLE001 - e.g. the model's config is not cached here; the page still renders
        view["note"] = f"No `ft size` prediction: {exc}"
    if view["measured_gib"] is None and view["note"] is None:
        view["note"] = "The run's metrics.jsonl has no measured GPU peak."
    return view


def benchmark_view(report: dict[str, Any]) -> dict[str, Any] | None:
    """The forgetting check (eval.benchmarks): each task's score base vs tuned and whether it held."""
    bench = report.get("benchmarks")
    if not isinstance(bench, dict) or not bench:
        return None
    harness = report.get("benchmark_harness") or {}
    return {
        "version": harness.get("lm_eval_version"),
        "limit": harness.get("limit"),
        "max_drop": (report.get("rule") or {}).get("max_benchmark_drop"),
        "rows": [
            {
                "task": task,
                "metric": b.get("metric"),
                "base": b.get("base"),
                "tuned": b.get("tuned"),
                "relative": b.get("relative_change"),
                "ok": b.get("ok"),
            }
            for task, b in bench.items()
            if isinstance(b, dict)
        ],
    }


def run_context(src: dict[str, Any]) -> dict[str, Any]:
    run, recipe, report = src["run"], src["recipe"], src["eval"]
    name = str(run.get("name") or src["dir"].name)
    eval_s, data_s = _section(recipe, "eval"), _section(recipe, "data")
    ctx: dict[str, Any] = {
        "name": name,
        "run": run,
        "recipe_name": recipe.get("name"),
        "description": recipe.get("description"),
        "model": _section(recipe, "model").get("name_or_path"),
        "train": _section(recipe, "train"),
        "lora": _section(recipe, "lora"),
        "charts": run_charts(src["metrics"], name),
        "report": report if isinstance(report, dict) else None,
        "data": data_view(src["data"], recipe),
        "env": env_view(src["env"]),
        "sizing": sizing_view(src["dir"], src["env"], src["metrics"]),
        "labels": None,
        "benchmarks": benchmark_view(report) if isinstance(report, dict) else None,
        "worst": [],
        "best": [],
    }
    if ctx["report"]:
        primary = (report.get("rule") or {}).get("primary_metric") or "token_f1"
        ctx["primary"] = METRIC_LABELS.get(primary, primary)
        ctx["metric_rows"] = metric_rows(report)
        n = int(eval_s.get("worst_examples") or 5)
        ctx["worst"], ctx["best"] = worst_and_best(src["predictions"], primary, n)
        if data_s.get("label_field") and src["predictions"]:
            ctx["labels"] = label_views(src["predictions"], str(data_s["label_field"]), data_s.get("labels"))
    return ctx


def render_run(run_dir: Path, **loaded: Any) -> str:
    return environment().get_template("run.html").render(**run_context(load_run(Path(run_dir), **loaded)))


def write_run_report(run_dir: Path, out: Path | None = None, **loaded: Any) -> Path:
    """Render `run_dir`'s page into `out` (default: <run>/eval/report.html), atomically."""
    run_dir = Path(run_dir)
    return write_text(Path(out) if out else run_dir / "eval" / "report.html", render_run(run_dir, **loaded))
