"""`train.report_to`: the tiny recipe trained with TensorBoard and MLflow through transformers' own
callbacks, read back by the libraries' own readers; no credential in any file of the run directory.
One short run (4 steps) is shared by the tests in this file."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import struct
from pathlib import Path

import pytest

from ft.cli import main

SECRETS = {
    "WANDB_API_KEY": "wandb-secret-4f1c9a7e55d2",
    "HF_TOKEN": "hf_secretTOKENvalue12345",
    "MLFLOW_TRACKING_TOKEN": "mlflow-secret-77aa0b3c",
}
TRACKER_ENV = (
    "TENSORBOARD_LOGGING_DIR",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_ALLOW_FILE_STORE",
    "MLFLOW_DISABLE_TELEMETRY",
    "MLFLOW_RUN_ID",
    "MLFLOW_TAGS",
    "WANDB_MODE",
    "WANDB_DIR",
    "WANDB_RUN_ID",
)
# W&B is not in the test lock (the `trackers` extra has TensorBoard and MLflow); where it is installed, the
# same run also feeds it, offline.
HAS_WANDB = importlib.util.find_spec("wandb") is not None


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, ft_cache):
    from ft.report import trackers

    work = tmp_path_factory.mktemp("tracked")
    cwd = os.getcwd()
    os.chdir(work)
    saved = {k: os.environ.get(k) for k in (*TRACKER_ENV, *SECRETS)}
    for name in TRACKER_ENV:
        os.environ.pop(name, None)
    os.environ.update(SECRETS)
    os.environ.update({"WANDB_MODE": "offline", "WANDB_DIR": str(work)})  # what a user sets up for W&B
    console = io.StringIO()
    args = ["run", "--recipe", "tiny", "--set", "output.run_name=tracked", "--set", "train.max_steps=4"]
    names = "tensorboard, mlflow" + (", wandb" if HAS_WANDB else "")
    try:
        with contextlib.redirect_stdout(console):
            assert main([*args, "--set", f"train.report_to=[{names}]"]) == 0
    finally:
        os.chdir(cwd)
        for name, value in saved.items():  # ft leaves the trackers' variables set for the process
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        trackers._set_by_ft.clear()
    return work / "runs" / "tracked"


def _event_accumulator(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_holds_the_training_loss_and_the_final_metrics(tracked):
    logdir = tracked / "tensorboard"
    assert any(p.name.startswith("events.out.tfevents") for p in logdir.iterdir())
    acc = _event_accumulator(logdir)
    scalars = set(acc.Tags()["scalars"])
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    logged = [json.loads(line) for line in (tracked / "metrics.jsonl").read_text().splitlines()]
    ours = {r["step"]: r["loss"] for r in logged if "loss" in r}
    assert all(abs(e.value - ours[e.step]) < 1e-4 for e in loss)  # the same curve ft's own log has
    report = json.loads((tracked / "eval" / "report.json").read_text())
    for side in ("base", "tuned"):
        value = report["metrics"][side]["schema_valid"]
        (event,) = acc.Scalars(f"final/{side}/schema_valid")
        assert event.step == 4 and abs(event.value - value) < 1e-6
    (keep,) = acc.Scalars("final/keep")
    assert keep.value == (1.0 if report["decision"]["verdict"] == "KEEP" else 0.0)
    assert "eval/loss" in scalars
    texts = acc.Tags()["tensors"]  # add_text lands as tensors
    assert "final/decision/text_summary" in texts and "ft/recipe/text_summary" in texts


def test_mlflow_run_holds_recipe_training_loss_final_metrics_and_decision(tracked, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only on request
    store = tracked / "mlruns"
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    experiment = client.get_experiment_by_name("tiny")  # the recipe's name
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["ft.name"] == "tiny"
    assert params["ft.train.max_steps"] == "4" and params["ft.train.learning_rate"] == "0.01"
    assert params["ft.train.report_to"].startswith("['tensorboard', 'mlflow'")
    assert params["learning_rate"] == "0.01"  # TrainingArguments, logged by transformers' callback
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    report = json.loads((tracked / "eval" / "report.json").read_text())
    for side in ("base", "tuned"):
        assert run.data.metrics[f"final/{side}/schema_valid"] == pytest.approx(
            report["metrics"][side]["schema_valid"]
        )
    assert run.data.tags["ft.decision"] == report["decision"]["verdict"]
    assert run.data.tags["ft.decision_reasons"].startswith(report["decision"]["verdict"])


def _wandb_records(path: Path):
    """The protobuf records of an offline W&B run file (a LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending = path.read_bytes(), 7, 32768, b""  # 7: the ":W&B" file header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            pending = b""
            yield record
        elif kind in (2, 3):
            pending += chunk


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (not in the test lock)")
def test_wandb_offline_run_holds_training_loss_recipe_and_final_metrics(tracked):
    (path,) = (tracked.parent.parent / "wandb").glob("offline-run-*/run-*.wandb")
    names, summary, config, losses = [], {}, {}, []
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            names.append(record.run.display_name)
        elif kind == "summary":
            summary.update({u.key: json.loads(u.value_json) for u in record.summary.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "train/loss" in items:
                losses.append(items["train/global_step"])
    assert names[0] == "tracked" and losses == [1, 2, 3, 4]
    report = json.loads((tracked / "eval" / "report.json").read_text())
    assert summary["final/decision"] == report["decision"]["verdict"]
    assert summary["final/tuned/schema_valid"] == pytest.approx(report["metrics"]["tuned"]["schema_valid"])
    assert config["ft"]["train.max_steps"] == "4" and config["learning_rate"] == 0.01


def test_no_credential_in_any_file_of_the_run(tracked):
    files = [p for p in tracked.parent.parent.rglob("*") if p.is_file()]  # the run, and W&B's own folder
    assert any("mlruns" in p.parts for p in files) and any("tensorboard" in p.parts for p in files)
    for path in files:
        data = path.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in data, f"{name} written to {path.relative_to(tracked.parent.parent)}"


def test_unknown_tracker_is_one_line_with_a_suggestion(tmp_path, capsys):
    args = ["data", "check", "--recipe", "tiny", "--set", "train.report_to=[tensorbord]"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "train.report_to" in err and "did you mean 'tensorboard'?" in err


def test_missing_tracker_package_names_the_install(tiny_settings, tmp_path, monkeypatch):
    import importlib.util

    from ft.errors import FtError
    from ft.report import trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    settings = tiny_settings(**{"train.report_to": ["wandb"]})
    with pytest.raises(FtError, match="train.report_to: wandb is not installed"):
        trackers.report_to(settings, tmp_path)


def test_no_tracker_by_default(tiny_settings, tmp_path):
    from ft.train import build_sft_config

    settings = tiny_settings()
    assert settings.train.report_to == []
    config = build_sft_config(settings, tmp_path / "run", "cpu", 8, 1, "float32", True)
    assert config.report_to == [] and config.run_name == "run"


def test_eval_again_adds_to_the_same_mlflow_run(tracked, monkeypatch, capsys):
    """`ft eval` in a later process (no tracker variables set) finds the training's run; MLflow params
    are write-once, so the recipe logged first stays. Last in this file: it adds points to the run."""
    from mlflow import MlflowClient

    from ft.report import trackers

    for name in TRACKER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(trackers, "_set_by_ft", {})
    assert main(["eval", str(tracked)]) == 0
    assert "warning: mlflow" not in capsys.readouterr().err  # W&B wants WANDB_RUN_ID for this; it says so
    client = MlflowClient(tracking_uri=(tracked / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "final/keep")] == [4, 4]
