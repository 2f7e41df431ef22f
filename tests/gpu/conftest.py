"""Helpers for the GPU tests (`nox -s gpu`): every test here carries the `gpu` marker and is skipped
without CUDA. Training runs in subprocesses through the real `ft` command line, so each starts with
Unsloth (when it is the backend) before transformers, and with an empty CUDA allocator."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run_ft(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m ft ARGS` from this checkout, offline."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "ft", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _last_json(stdout: str) -> dict:
    """The JSON document `--json` printed last (Unsloth prints its banner to stdout before it)."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


@pytest.fixture
def run_ft():
    """run_ft(*args, cwd=...) -> CompletedProcess of `python -m ft ARGS` from this checkout, offline."""
    return _run_ft


@pytest.fixture
def last_json():
    """last_json(stdout) -> the JSON document `--json` printed last."""
    return _last_json


@pytest.fixture(params=["unsloth", "hf"])
def backend(request) -> str:
    """Each backend in turn; Unsloth is skipped where it is not installed."""
    if request.param == "unsloth" and importlib.util.find_spec("unsloth") is None:
        pytest.skip("unsloth is not installed")
    return request.param


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> Path:
    """A random-weight 2-layer Qwen2 shaped for bitsandbytes' and Unsloth's kernels (hidden 256, head_dim
    64), with the tiny model's tokenizer: trains in seconds."""
    from ft.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("small-qwen2"), hidden=256, layers=2)


@pytest.fixture(scope="session")
def qwen05b_shape(tmp_path_factory) -> Path:
    """Random bf16 weights in the published Qwen2.5-0.5B shape, built on the GPU by the benchmark script."""
    out = tmp_path_factory.mktemp("qwen2.5-0.5b")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--build-model", "qwen2.5-0.5b"]
        + ["--model-dir", str(out)],
        check=True,
        env=env,
        timeout=900,
    )
    return out
