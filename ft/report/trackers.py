"""Experiment trackers (`train.report_to`) through the callbacks transformers ships.

Training curves come from transformers' own TensorBoardCallback / MLflowCallback / WandbCallback, which
read their settings from the environment; `report_to` points that environment at the run directory
(offline) unless the user set it: TensorBoard event files in RUN/tensorboard, an MLflow file store in
RUN/mlruns (experiment = recipe name). W&B is left exactly as the user set it up (WANDB_MODE, project,
key, folder): ft sets none of its variables and never turns it online. After the eval stage `log_final`
adds the resolved recipe, the base/tuned metrics and the KEEP/DISCARD decision to the same run.

trackio is not offered: 0.43 pins pillow<13, below the lock's, and brings a web-server stack.
The tracker libraries are heavy, so they are imported only where a run uses them.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

from ft.errors import FtError
from ft.secrets import redact

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # the module each imports
INSTALL = {
    "tensorboard": "pip install 'ft[trackers]'",
    "mlflow": "pip install 'ft[trackers]'",
    "wandb": "pip install wandb",
}
# What ft set, so a later run in the same process (tests, notebooks) can point it at its own directory
# while a value the user set stays untouched.
_set_by_ft: dict[str, str] = {}


def _default_env(name: str, value: str) -> str:
    current = os.environ.get(name)
    if current is None or current == _set_by_ft.get(name):
        os.environ[name] = value
        _set_by_ft[name] = value
    return os.environ[name]


def tensorboard_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "tensorboard"


def mlflow_uri(run_dir: Path) -> str:
    """The user's MLFLOW_TRACKING_URI, else a file store in the run directory (unless ft set it)."""
    mine = Path(run_dir).resolve() / "mlruns"
    current = os.environ.get("MLFLOW_TRACKING_URI")
    if current and current != _set_by_ft.get("MLFLOW_TRACKING_URI"):
        return current
    return mine.as_uri()


def _mlflow_env(settings, run_dir: Path) -> str:
    uri = _default_env("MLFLOW_TRACKING_URI", mlflow_uri(run_dir))
    if uri.startswith("file:"):
        # MLflow 3.x refuses its file store unless asked; a local store needs no server or database.
        _default_env("MLFLOW_ALLOW_FILE_STORE", "true")
    _default_env("MLFLOW_EXPERIMENT_NAME", settings.name)
    _default_env("MLFLOW_DISABLE_TELEMETRY", "true")  # offline unless the user says otherwise
    return uri


def report_to(settings, run_dir: Path) -> list[str]:
    """The trackers for TRL's `report_to`, their environment pointed at `run_dir` (offline by default)."""
    names = list(settings.train.report_to)
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise FtError(
                f"train.report_to: {name} is not installed",
                hint=f"{INSTALL[name]}, or drop it from train.report_to",
            )
    if "tensorboard" in names:
        _default_env("TENSORBOARD_LOGGING_DIR", str(tensorboard_dir(run_dir)))
    if "mlflow" in names:
        _mlflow_env(settings, run_dir)
    return names


def _final_values(report: dict[str, Any]) -> dict[str, float]:
    out = {}
    for side in ("base", "tuned"):
        for metric, value in (report.get("metrics", {}).get(side) or {}).items():
            if isinstance(value, (int, float)) and value == value:  # NaN is not a metric
                out[f"final/{side}/{metric}"] = float(value)
    for metric, value in (report.get("decision", {}).get("deltas") or {}).items():
        if isinstance(value, (int, float)):
            out[f"final/delta/{metric}"] = float(value)
    out["final/keep"] = 1.0 if report.get("decision", {}).get("verdict") == "KEEP" else 0.0
    return out


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = redact(str(v))
    return out


def _decision_text(report: dict[str, Any]) -> str:
    decision = report.get("decision", {})
    reasons = "; ".join(decision.get("reasons") or [])
    return redact(f"{decision.get('verdict', '?')}: {reasons}" if reasons else str(decision.get("verdict")))


def _log_tensorboard(settings, run_dir: Path, report: dict[str, Any], step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter  # the writer transformers' callback uses

    logdir = os.environ.get("TENSORBOARD_LOGGING_DIR")
    if not logdir or logdir == _set_by_ft.get("TENSORBOARD_LOGGING_DIR"):
        logdir = str(tensorboard_dir(run_dir))
    writer = SummaryWriter(log_dir=logdir)
    try:
        for key, value in _final_values(report).items():
            writer.add_scalar(key, value, step)
        writer.add_text("final/decision", _decision_text(report), step)
        writer.add_text("ft/recipe", "```yaml\n" + redact(settings.to_yaml()) + "\n```", step)
    finally:
        writer.close()


def _mlflow_run_id(client, settings, run_name: str) -> str | None:
    if os.environ.get("MLFLOW_RUN_ID"):  # the run the user told transformers' callback to resume
        return os.environ["MLFLOW_RUN_ID"]
    experiment = client.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME") or settings.name)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.runName = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _log_mlflow(settings, run_dir: Path, report: dict[str, Any], step: int) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

    uri = _mlflow_env(settings, run_dir)  # the same store in a later `ft eval` process
    client = MlflowClient(tracking_uri=uri)
    run_id = _mlflow_run_id(client, settings, run_dir.name)
    if run_id is None:
        raise FtError(f"no MLflow run named {run_dir.name} in {redact(uri)} (was it trained with mlflow?)")
    now = int(time.time() * 1000)
    # Prefixed, so they never clash with the TrainingArguments params the callback logged (learning_rate...).
    params = [Param(f"ft.{k}", v[:MAX_PARAM_VAL_LENGTH]) for k, v in _flat(settings.to_dict()).items()]
    params.append(Param("ft.recipe_sha256", settings.sha256))
    # MLflow params are write-once: a repeated `ft eval` keeps what the first logging recorded.
    logged = client.get_run(run_id).data.params
    params = [p for p in params if p.key not in logged]
    for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=params[i : i + MAX_PARAMS_TAGS_PER_BATCH])
    metrics = [Metric(k, v, now, step) for k, v in _final_values(report).items()]
    tags = [
        RunTag("ft.decision", str(report.get("decision", {}).get("verdict"))),
        RunTag("ft.decision_reasons", _decision_text(report)[:MAX_PARAM_VAL_LENGTH]),
    ]
    client.log_batch(run_id, metrics=metrics, tags=tags)


def _log_wandb(settings, run_dir: Path, report: dict[str, Any], step: int) -> None:
    import wandb

    run = wandb.run  # transformers' callback leaves its run open after training (`ft run`)
    if run is None:
        if not os.environ.get("WANDB_RUN_ID"):
            raise RuntimeError(
                "no W&B run in this process; set WANDB_RUN_ID to add them to the training's run"
            )
        run = wandb.init(
            project=os.getenv("WANDB_PROJECT", "huggingface"), id=os.environ["WANDB_RUN_ID"], resume="allow"
        )
    run.config.update(
        {"ft": _flat(settings.to_dict()), "ft_recipe_sha256": settings.sha256}, allow_val_change=True
    )
    run.summary.update(
        {
            **_final_values(report),
            "final/decision": str(report.get("decision", {}).get("verdict")),
            "final/decision_reasons": _decision_text(report),
            "final/step": step,
        }
    )
    run.finish()


LOGGERS = {"tensorboard": _log_tensorboard, "mlflow": _log_mlflow, "wandb": _log_wandb}


def log_final(settings, run_dir: Path, report: dict[str, Any], step: int) -> None:
    """Log the recipe, the eval metrics and the decision to each tracker's run of `run_dir`.

    The eval outputs are already on disk, so a tracker that fails costs a warning, not the run.
    """
    for name in settings.train.report_to:
        try:
            LOGGERS[name](settings, Path(run_dir), report, step)
        except Exception as exc:  # noqa: BLE001 - a tracker must not undo a finished evaluation
            print(redact(f"warning: {name}: final metrics not logged: {exc}"), file=sys.stderr)
