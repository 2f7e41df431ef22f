"""Comparing a rerun with its sealed bundle: environment differences and metric tolerance."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from ft.bundle import BundleError, package
from ft.bundle.reproduce import (
    EnvDiff,
    compare_env,
    compare_metrics,
    env_facts,
    load_bundle,
    render_reproduce,
)

ENV = {
    "python": "3.11.7",
    "os": "Linux 6.1",
    "gpu": {
        "devices": [{"name": "NVIDIA H100"}],
        "driver": "580.1",
        "cuda_runtime": "12.8",
        "cudnn": "91000",
    },
    "packages": {
        "torch": "2.13.0",
        "transformers": "5.17.0",
        "peft": "0.21.2",
        "trl": "1.14.2",
        "unsloth": None,
    },
    "lockfile": {"sha256": "ab" * 32},
    "image": {"id": "sha256:aaa"},
    "git_commit": "0123abcd",
}


def report(verdict: str = "KEEP", **tuned: float) -> dict:
    metrics = {"exact_match": 0.70, "json_valid": 1.0, "eval_loss": 0.50} | tuned
    return {"decision": {"verdict": verdict}, "metrics": {"base": {}, "tuned": metrics}}


def test_identical_environments_have_no_differences():
    assert compare_env(ENV, copy.deepcopy(ENV)) == []


def test_each_changed_fact_is_reported_side_by_side():
    now = copy.deepcopy(ENV)
    now["packages"]["torch"] = "2.14.0"
    now["gpu"] = {
        "devices": [{"name": "NVIDIA H200"}],
        "driver": "590.2",
        "cuda_runtime": "13.0",
        "cudnn": None,
    }
    now["lockfile"]["sha256"] = "cd" * 32
    now["image"] = None
    now.pop("git_commit")
    now["git"] = {"commit": "fedcba98"}
    now["python"] = "3.12.1"
    diffs = {d.fact: (d.sealed, d.current) for d in compare_env(ENV, now)}
    assert diffs == {
        "python": ("3.11.7", "3.12.1"),
        "torch": ("2.13.0", "2.14.0"),
        "lockfile sha256": ("ab" * 32, "cd" * 32),
        "image id": ("sha256:aaa", None),
        "git commit": ("0123abcd", "fedcba98"),
        "GPU": ("NVIDIA H100", "NVIDIA H200"),
        "NVIDIA driver": ("580.1", "590.2"),
        "CUDA runtime": ("12.8", "13.0"),
        "cuDNN": ("91000", None),
    }


def test_env_facts_cover_the_promised_list_and_survive_sparse_manifests():
    facts = env_facts({})
    for fact in ("python", "os", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes",
                 "unsloth", "lockfile sha256", "image id", "git commit", "GPU", "NVIDIA driver", "CUDA runtime",
                 "cuDNN"):  # fmt: skip
        assert fact in facts and facts[fact] is None


def test_metrics_within_tolerance_pass():
    cmp = compare_metrics(report(), report(exact_match=0.71, eval_loss=0.49), tolerance=0.02)
    assert cmp.passed and cmp.reasons == []
    row = next(r for r in cmp.rows if r.metric == "exact_match")
    assert row.sealed == 0.70 and row.new == 0.71 and row.diff == pytest.approx(0.01) and row.within


def test_boundary_is_inclusive():
    assert compare_metrics(report(exact_match=0.5), report(exact_match=0.52), tolerance=0.02).passed


def test_metric_outside_tolerance_fails():
    cmp = compare_metrics(report(), report(exact_match=0.60), tolerance=0.02)
    assert not cmp.passed
    assert cmp.reasons == ["exact_match: moved by 0.1000 > 0.02"]


def test_verdict_change_fails_even_with_close_metrics():
    cmp = compare_metrics(report("KEEP"), report("DISCARD"), tolerance=0.5)
    assert not cmp.passed and "verdict changed: KEEP -> DISCARD" in cmp.reasons


def test_missing_or_nan_metric_fails():
    new = report()
    del new["metrics"]["tuned"]["json_valid"]
    new["metrics"]["tuned"]["eval_loss"] = float("nan")
    cmp = compare_metrics(report(), new, tolerance=1.0)
    assert not cmp.passed
    assert cmp.reasons == ["json_valid: missing", "eval_loss: missing"]


def test_absent_on_both_sides_is_not_a_failure():
    sealed, new = report(), report()
    sealed["metrics"]["tuned"]["schema_valid"] = None
    new["metrics"]["tuned"]["schema_valid"] = None
    assert compare_metrics(sealed, new, tolerance=0.0).passed


def test_render_shows_both_tables_and_the_outcome():
    cmp = compare_metrics(report(), report(exact_match=0.5), tolerance=0.02)
    text = render_reproduce([EnvDiff("torch", "2.13.0", "2.14.0")], cmp)
    assert "| torch | 2.13.0 | 2.14.0 |" in text
    assert "| exact_match | 0.7000 | 0.5000 | 0.2000 | NO |" in text
    assert "| verdict | KEEP | KEEP | | yes |" in text
    assert "**FAIL**" in text
    ok = render_reproduce([], compare_metrics(report(), report(), tolerance=0.0))
    assert "No differences" in ok and "**PASS**" in ok


# ---------------------------------------------------------------- load_bundle


def _run(root: Path) -> Path:
    run = root / "runs" / "r1"
    (run / "adapter").mkdir(parents=True)
    (run / "eval").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    for name, obj in {
        "run.json": {"name": "r1", "status": "complete", "ended": "2026-01-01T00:00:00Z"},
        "env.json": ENV,
        "data.json": {"files": []},
        "eval/report.json": report(),
    }.items():
        (run / name).write_text(json.dumps(obj))
    (run / "recipe.resolved.yaml").write_text("name: r\n")
    return run


def test_load_bundle_verifies_and_extracts_into_the_work_dir(tmp_path):
    out = package(_run(tmp_path), tmp_path / "bundles")
    bundle_dir, manifest = load_bundle(tmp_path / "bundles" / "r1.tar.gz", tmp_path / "work")
    assert bundle_dir == (tmp_path / "work" / "r1").resolve()
    assert manifest["run"] == "r1" and manifest["verdict"] == "KEEP"
    assert json.loads((bundle_dir / "env.json").read_text()) == ENV
    same_dir, _ = load_bundle(out)
    assert same_dir == out


def test_load_bundle_refuses_a_tampered_bundle(tmp_path):
    out = package(_run(tmp_path), tmp_path / "bundles", archive=False)
    (out / "env.json").write_text(json.dumps({**ENV, "python": "3.99"}))
    with pytest.raises(BundleError, match="env.json"):
        load_bundle(out)
