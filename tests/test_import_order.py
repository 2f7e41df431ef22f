"""Unsloth is imported before transformers, and before CUDA is initialised, on every path that can train or
generate: `ft run`, `ft train`, `ft eval`, `ft reproduce`, `ft size --probe` and the benchmark's worker.

Each command runs in a subprocess on a machine that looks like a CUDA box to ft (a fake nvidia-smi, an
image record for cu130, and torch.cuda patched by a sitecustomize: available, one H100, and any call that
would initialise CUDA on a real GPU marks it initialised). The model is a Hub id that is neither cached
nor one of the sizing model's built-in shapes, the case where the preflight's sizing reaches for
transformers' AutoConfig. A fake `unsloth` package records what was loaded when it was imported and ends
the process there (exit 97): what comes after the import needs a real GPU, and the order is all that is
checked here. Unsloth's own import sets PYTORCH_ALLOC_CONF=expandable_segments:True (unsloth_zoo's
__init__), which torch reads only when CUDA is initialised, hence the second condition.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "acme-labs/widget-lm-3b"  # not cached (empty HF_HOME), not a preset of ft.sizing
IMPORTED = 97  # the fake unsloth's exit code: it was imported, in the right order

SITECUSTOMIZE = '''
"""Test only: torch.cuda as ft sees it on a one-H100 machine, without a GPU."""
import os

if os.environ.get("FT_TEST_FAKE_CUDA") == "1":
    import types

    import torch

    _cuda = torch.cuda
    _state = {"initialized": False}
    _props = types.SimpleNamespace(
        name="NVIDIA H100 80GB HBM3", total_memory=81559 << 20, major=9, minor=0, multi_processor_count=132
    )

    def _lazy_init():
        _state["initialized"] = True

    def _initialising(value):
        def call(*args, **kwargs):
            _lazy_init()  # what these calls do on a real GPU
            return value

        return call

    _cuda.is_available = lambda: True  # NVML/driver query only: does not initialise CUDA
    _cuda.device_count = lambda: 1
    _cuda.is_initialized = lambda: _state["initialized"]
    _cuda._lazy_init = _lazy_init
    _cuda.init = _lazy_init
    _cuda.get_device_properties = _initialising(_props)
    _cuda.get_device_name = _initialising(_props.name)
    _cuda.get_device_capability = _initialising((9, 0))
    _cuda.current_device = _initialising(0)
    _cuda.set_device = _initialising(None)
    _cuda.synchronize = _initialising(None)
    _cuda.mem_get_info = _initialising((80 << 30, 81559 << 20))
    _cuda.is_bf16_supported = lambda including_emulation=True: _initialising(True)()
'''

FAKE_UNSLOTH = '''
"""Test only: records what was loaded before it, then ends the process (exit 97)."""
import json
import os
import sys

_torch = sys.modules.get("torch")
_seen = {
    "argv": sys.argv[1:3],
    "loaded_first": sorted(m for m in ("transformers", "trl", "peft") if m in sys.modules),
    "cuda_initialized": bool(_torch is not None and _torch.cuda.is_initialized()),
}
with open(os.environ["FAKE_UNSLOTH_MARKER"], "a", encoding="utf-8") as _f:
    _f.write(json.dumps(_seen) + "\\n")
if _seen["loaded_first"] or _seen["cuda_initialized"]:
    raise ImportError(f"fake unsloth: imported too late: {_seen}")
sys.stdout.flush()
sys.stderr.flush()
os._exit(97)
'''

NVIDIA_SMI = """#!/bin/sh
case "$*" in
  *index,name,driver_version,memory.total,memory.free*)
    echo "0, NVIDIA H100 80GB HBM3, 580.65.06, 81559, 80000" ;;
  *name,memory.total,driver_version*) echo "NVIDIA H100 80GB HBM3, 81559, 580.65.06" ;;
  *) echo "NVIDIA-SMI 580.65.06" ;;
esac
"""

RECIPE = {
    "name": "order",
    "model": {"name_or_path": HUB_ID, "quantization": "nf4", "dtype": "auto"},
    "train": {"backend": "unsloth", "device": "cuda", "max_seq_length": 1024, "micro_batch": "auto"},
    "data": {"train": ["builtin:tickets.jsonl"]},
}


# Each case starts `ft` in a fresh interpreter (torch, and for some transformers, imported there): about
# 40 s in all on 2 cores. They run in `nox -s slow` (part of `nox` and CI), keeping the default test run
# within issue 8's budget.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def machine(tmp_path_factory) -> dict:
    """The fake CUDA machine: the fakes on PYTHONPATH, nvidia-smi on PATH, the files the commands read."""
    root = tmp_path_factory.mktemp("import-order")
    site, bin_dir = root / "site", root / "bin"
    (site / "unsloth").mkdir(parents=True)
    bin_dir.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (site / "unsloth" / "__init__.py").write_text(FAKE_UNSLOTH)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(NVIDIA_SMI)
    smi.chmod(0o755)
    (root / "image.json").write_text(json.dumps({"flavour": "cu130"}))
    (root / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    run = _fabricated_run(root, root / "recipe.yaml")
    from ft.bundle import package

    bundle = package(run, root / "bundles", include_data=True, archive=False)
    return {"root": root, "site": site, "bin": bin_dir, "run": run, "bundle": bundle}


def _fabricated_run(root: Path, recipe: Path) -> Path:
    """A finished run of RECIPE on Unsloth, as `ft eval` and `ft package` read it (no weights needed)."""
    from ft.config import builtin_data_path, load_settings

    settings = load_settings(str(recipe), [])
    run = root / "runs" / "order"
    (run / "adapter").mkdir(parents=True)
    (run / "eval").mkdir()
    (run / "recipe.resolved.yaml").write_text(yaml.safe_dump(settings.to_dict()))
    (run / "env.json").write_text(json.dumps({"python": sys.version.split()[0], "packages": {}}))
    data = builtin_data_path("tickets.jsonl")
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    entry = {"name": "builtin:tickets.jsonl", "path": "builtin:tickets.jsonl", "sha256": sha}
    (run / "data.json").write_text(json.dumps({"files": [entry]}))
    meta = {"name": "order", "status": "complete", "backend": "unsloth", "device": "cuda", "data_sha256": sha}
    (run / "run.json").write_text(json.dumps({**meta, "ended": "2026-11-02T10:20:30Z"}))
    (run / "adapter" / "adapter_config.json").write_text('{"r": 16}')
    report = {"decision": {"verdict": "KEEP"}, "metrics": {"base": {}, "tuned": {"schema_valid": 1.0}}}
    (run / "eval" / "report.json").write_text(json.dumps(report))
    return run


def run_entry(
    machine: dict, tmp_path: Path, *argv: str, **extra_env: str
) -> tuple[subprocess.CompletedProcess, list[dict]]:
    marker = tmp_path / "unsloth-imports.jsonl"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(machine["site"]), str(ROOT)]),
        "PATH": os.pathsep.join([str(machine["bin"]), os.environ.get("PATH", "")]),
        "FT_TEST_FAKE_CUDA": "1",
        "FT_ASSUME_CUDA": "1",  # ft.manifest.cuda_available: as if /dev/nvidia0 existed
        "FT_IMAGE_INFO": str(machine["root"] / "image.json"),
        "FAKE_UNSLOTH_MARKER": str(marker),
        "HF_HOME": str(tmp_path / "hf-home"),  # an empty Hub cache: HUB_ID is not cached
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        **extra_env,
    }
    env.pop("FT_REQUIRE_GPU", None)
    out = subprocess.run(
        [sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    seen = [json.loads(line) for line in marker.read_text().splitlines()] if marker.exists() else []
    return out, seen


def assert_unsloth_first(out: subprocess.CompletedProcess, seen: list[dict]) -> None:
    detail = (out.returncode, out.stdout[-2000:], out.stderr[-4000:])
    assert "must be imported before" not in out.stderr, detail
    assert seen, ("unsloth was never imported", *detail)
    assert seen[0]["loaded_first"] == [], ("transformers/trl/peft were imported before unsloth", *detail)
    assert seen[0]["cuda_initialized"] is False, ("CUDA was initialised before unsloth", *detail)
    assert out.returncode == IMPORTED, detail


FT = ("-m", "ft")


def _bench_worker(kind: str, work: Path) -> list[str]:
    spec = {"id": f"x-{kind}", "kind": kind, "backend": "unsloth", "model": "qwen2.5-0.5b"}
    spec |= {"micro": 1, "seq": 512, "warmup": 1, "steps": 1, "group": "throughput"}
    args = ["--worker", json.dumps(spec), "--model-dir", str(work / "m"), "--result", str(work / "r")]
    return [str(ROOT / "benchmarks" / "bench_gpu.py"), *args]


def entries(machine: dict, work: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (argv after the interpreter, extra environment) of each entry that trains or generates."""
    recipe = ["--recipe", str(machine["root"] / "recipe.yaml")]
    builtin = [*recipe, "--set", "model.name_or_path=builtin:tiny-qwen2"]
    return {
        "ft run": ([*FT, "run", *recipe], {}),
        "ft train": ([*FT, "train", *recipe], {}),
        # the preflight's sizing of builtin:tiny-qwen2 would build it first (ensure_tiny_model)
        "ft train, built-in model, cold cache": ([*FT, "train", *builtin], {"FT_CACHE": str(work / "cold")}),
        "ft size --probe": ([*FT, "size", *recipe, "--probe"], {}),
        "ft eval": ([*FT, "eval", str(machine["run"])], {}),
        "ft reproduce": ([*FT, "reproduce", str(machine["bundle"]), "--work", str(work / "w")], {}),
        "bench worker (ft)": (_bench_worker("ft", work), {}),
        "bench worker (bare Unsloth)": (_bench_worker("bare", work), {}),
    }


ENTRIES = list(entries({"root": Path(), "run": "", "bundle": ""}, Path()))


@pytest.fixture(scope="module")
def outcomes(machine, tmp_path_factory) -> dict:
    """Every entry point run once, a few at a time (each is mostly imports)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(name: str):
        work = tmp_path_factory.mktemp("entry")
        argv, env = entries(machine, work)[name]
        return name, run_entry(machine, work, *argv, **env)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(one, ENTRIES))


@pytest.mark.parametrize("name", ENTRIES)
def test_unsloth_is_imported_first(outcomes, name):
    assert_unsloth_first(*outcomes[name])


def test_building_the_tiny_model_leaves_this_process_free_of_transformers(machine, tmp_path):
    """Where Unsloth is installed and may still have to be imported, the build runs in a child process."""
    code = "import sys; from ft.testing import ensure_tiny_model; p = ensure_tiny_model(); "
    code += "print(p, 'transformers' in sys.modules, 'torch' in sys.modules)"
    path = os.pathsep.join([str(machine["site"]), str(ROOT)])  # the fake unsloth is installed
    env = {**os.environ, "FT_CACHE": str(tmp_path / "cold"), "PYTHONPATH": path}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    built, transformers_loaded, torch_loaded = out.stdout.split()
    assert (transformers_loaded, torch_loaded) == ("False", "False")
    assert (Path(built) / "model.safetensors").is_file()  # the same bytes: tests/test_determinism.py


def test_the_fakes_catch_a_late_import(machine, tmp_path):
    """The check itself: transformers loaded, or CUDA initialised, before the import is seen and refused."""
    code = textwrap.dedent(
        """
        import sys, types, torch
        sys.modules["transformers"] = types.ModuleType("transformers")
        try:
            import unsloth
        except ImportError as exc:
            print(exc)
        del sys.modules["transformers"]
        torch.cuda.get_device_properties(0)
        import unsloth
        """
    )
    out, seen = run_entry(machine, tmp_path, "-c", code)
    assert out.returncode == 1 and out.stdout.count("imported too late") == 1, out.stderr[-2000:]
    assert "imported too late" in out.stderr
    assert [(s["loaded_first"], s["cuda_initialized"]) for s in seen] == [
        (["transformers"], False),
        ([], True),
    ]
