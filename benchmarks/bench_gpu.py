"""GPU benchmark: `ft train` on Unsloth vs the plain transformers+peft+bitsandbytes path, a bare Unsloth
loop (ft's overhead), and `ft size`'s predicted peak beside every measured one.

Never part of the tests (`nox -s bench`, GPU only). Models are built locally with random weights and the
published Qwen2.5 0.5B / 1.5B / 7B shapes (throughput and memory do not depend on the weights' values;
never read a loss from them as a quality figure). Every run uses the same synthetic data, LoRA (r=16,
alpha=32, all seven projections), gradient checkpointing, AdamW and bf16.

Each measurement runs in its own subprocess: Unsloth must be the first import of its process, and a
fresh process starts from an empty CUDA allocator. Results land in OUT/runs/*.json as they finish, so an
interrupted benchmark resumes where it stopped (and can be split over several commands with --only).
Tokens/s is steady state (warm-up steps skipped, CUDA synchronised at both ends); peak allocated memory
is torch.cuda.max_memory_allocated() over the steady-state steps, after reset_peak_memory_stats().

    python benchmarks/bench_gpu.py --out results/            # everything (GPU)
    python benchmarks/bench_gpu.py --list                    # the planned runs and their ids
    python benchmarks/bench_gpu.py --only 7b --out results/  # runs whose id contains "7b"
    python benchmarks/bench_gpu.py --dry-run --out /tmp/b    # CPU: configs + predicted sizing table only

benchmarks/gpu_check.py runs a budgeted subset of these workers (the throughput point and a small sizing
grid) with the GPU tests and `ft run`, in one offline command (`nox -s bench`, `nox -s gpu`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing ft

from ft import sizing  # noqa: E402  (cheap: no torch, no transformers)
from ft.errors import FtError  # noqa: E402
from ft.sizing.gpus import GIB, match_name, parse_gpu  # noqa: E402

MODELS = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b")
SWEEP_POINTS = "1x4096,4x2048,8x1024,16x2048"
THROUGHPUT_POINTS = "qwen2.5-7b:2x2048"
LORA_R, LORA_ALPHA, SEED, LR = 16, 32, 42, 2e-4
DISTS = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "bitsandbytes",
    "unsloth",
    "unsloth_zoo",
    "datasets",
)
# Done-when thresholds of issue 4 (checked, never assumed)
SPEEDUP_MIN, MEMORY_RATIO_MAX, OVERHEAD_MAX, SIZE_ERROR_MAX = 1.9, 0.65, 0.03, 0.10


# -- plan ------------------------------------------------------------------------------------------
def _points(text: str) -> list[tuple[int, int]]:
    """`1x4096,4x2048` -> [(1, 4096), (4, 2048)] (micro-batch x sequence length); ValueError if malformed."""
    out = []
    for part in text.split(","):
        micro, seq = part.strip().lower().split("x")
        if int(micro) < 1 or int(seq) < 1:
            raise ValueError(f"{part!r}: micro-batch and length must be positive")
        out.append((int(micro), int(seq)))
    return out


def _throughput(text: str) -> list[tuple[str, int, int]]:
    """`qwen2.5-7b:2x2048` -> [("qwen2.5-7b", 2, 2048)]; ValueError for an unknown shape or a bad point."""
    out = []
    for part in text.split(","):
        model, point = part.strip().split(":")
        if model not in sizing.PRESETS:
            raise ValueError(f"unknown shape {model!r}")
        micro, seq = _points(point)[0]
        out.append((model, micro, seq))
    return out


def plan(args) -> list[dict]:
    runs = []
    for model, micro, seq in _throughput(args.throughput):
        for kind, backend in (("ft", "unsloth"), ("ft", "hf"), ("bare", "unsloth")):
            runs.append(make_spec("throughput", kind, backend, model, micro, seq, args.warmup, args.steps))
    for model in args.models.split(","):
        for micro, seq in _points(args.sweep_points):
            for backend in ("unsloth", "hf"):
                runs.append(
                    make_spec("sweep", "ft", backend, model, micro, seq, args.sweep_warmup, args.sweep_steps)
                )
    if args.only:
        wanted = args.only.split(",")
        runs = [r for r in runs if any(w in r["id"] for w in wanted)]
    return runs


def make_spec(group, kind, backend, model, micro, seq, warmup, steps) -> dict:
    """One measurement: `kind` "ft" (ft's training loop) or "bare" (Unsloth + TRL alone)."""
    rid = f"{group}-{kind}-{backend}-{model}-{micro}x{seq}"
    return {
        "id": rid,
        "group": group,
        "kind": kind,
        "backend": backend,
        "model": model,
        "micro": micro,
        "seq": seq,
        "warmup": warmup,
        "steps": steps,
    }


# -- models ----------------------------------------------------------------------------------------
def write_config(preset: str, model_dir: Path) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "config.json"
    path.write_text(json.dumps(sizing.PRESETS[preset].to_config(), indent=2))
    return path


def build_model(preset: str, model_dir: Path) -> None:
    """Random bf16 weights created directly on the GPU (an fp32 CPU copy of a 7B model is wasteful),
    saved with save_pretrained, plus the tiny model's freshly trained tokenizer (no download)."""
    if (model_dir / ".complete").is_file():
        return
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ft.testing import build_tiny_model

    write_config(preset, model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(SEED)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(model_dir, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_model(tmp)
        for f in Path(tmp).iterdir():
            if f.name not in ("config.json", "generation_config.json") and not f.name.startswith("model"):
                shutil.copy2(f, model_dir / f.name)
    (model_dir / ".complete").write_text(preset)


# -- worker (one measurement per process) ------------------------------------------------------------
def _versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in DISTS:
        try:
            out[dist] = metadata.version(dist.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _rows(spec: dict, vocab: int) -> list[dict]:
    import random

    rng = random.Random(SEED)
    n = spec["micro"] * (spec["warmup"] + spec["steps"])
    rows = []
    for _ in range(n):
        ids = [rng.randrange(vocab) for _ in range(spec["seq"])]
        rows.append({"input_ids": ids, "labels": list(ids)})  # every token trained
    return rows


def _measure_callback(spec: dict, record: dict):
    import torch
    from transformers import TrainerCallback

    warmup, last = spec["warmup"], spec["warmup"] + spec["steps"]

    class Measure(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            inner = model.get_base_model() if hasattr(model, "get_base_model") else model
            fwd = inner.__dict__.get("forward") if inner is not None else None
            record["loss_path"] = (
                "chunked_nll" if fwd is not None and "chunk" in fwd.__name__ else "model forward"
            )
            record["checkpoint_fn"] = getattr(torch.utils.checkpoint.checkpoint, "__name__", None)

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup:
                torch.cuda.synchronize()
                record["peak_warmup_bytes"] = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                record["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == last:
                torch.cuda.synchronize()
                record["t1"] = time.perf_counter()
                record["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
                record["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()

    return Measure()


def _settings(spec: dict, model_dir: Path):
    from ft.config import load_settings

    steps = spec["warmup"] + spec["steps"]
    overrides = {
        "name": "bench",
        "model": {"name_or_path": str(model_dir), "quantization": "nf4", "dtype": "auto"},
        "lora": {
            "r": LORA_R,
            "alpha": LORA_ALPHA,
            "dropout": 0.0,
            "target_modules": list(sizing.PROJECTIONS),
        },
        "train": {
            "backend": spec["backend"],
            "device": "cuda",
            "max_seq_length": spec["seq"],
            "micro_batch": spec["micro"],
            "effective_batch": spec["micro"],
            "max_steps": steps,
            "learning_rate": LR,
            "gradient_checkpointing": True,
            "optimizer": "adamw_torch",
            "seed": SEED,
            "save_every": 100_000,
            "log_every": 1,
            "warmup_ratio": 0.0,
        },
        "data": {"label_field": None, "labels": None},
    }
    return load_settings("tiny", overrides)


def run_ft(spec: dict, model_dir: Path, out_dir: Path, record: dict) -> None:
    """`ft train`'s library path with a measuring callback added to ft's own."""
    import ft.train as training

    settings = _settings(spec, model_dir)
    original = training._callbacks
    training._callbacks = lambda run_dir, hint: original(run_dir, hint) + [_measure_callback(spec, record)]
    rows = _rows(spec, sizing.PRESETS[spec["model"]].vocab)
    result = training.train(
        settings,
        out_dir,
        rows,
        [],
        data_sha256="bench",
        device="cuda",
        backend=spec["backend"],
        backend_reason="benchmark",
        micro_batch=spec["micro"],
    )
    record["info"] = result.info


def run_bare(spec: dict, model_dir: Path, out_dir: Path, record: dict) -> None:
    """The same training written directly against Unsloth + TRL, as Unsloth's own examples do."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    from ft.backends.unsloth import _patched

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(model_dir), max_seq_length=spec["seq"], dtype=None, load_in_4bit=True
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules=list(sizing.PROJECTIONS),
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=SEED,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = _rows(spec, sizing.PRESETS[spec["model"]].vocab)
    data = Dataset.from_dict(
        {"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]}
    )
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)  # as ft decides: no emulated bf16
    args = SFTConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=spec["micro"],
        gradient_accumulation_steps=1,
        max_steps=spec["warmup"] + spec["steps"],
        learning_rate=LR,
        optim="adamw_torch",
        gradient_checkpointing=True,  # Unsloth's own default: its trainer turns its offloaded checkpointing on
        bf16=bf16,
        fp16=not bf16,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_length=spec["seq"],
        seed=SEED,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[_measure_callback(spec, record)],
    )
    trainer.train()
    record["info"] = {"patched": _patched(model)}


def worker(spec: dict, model_dir: Path, result_path: Path) -> None:
    if spec["backend"] == "unsloth":  # first, before anything imports transformers/trl/peft
        if spec["kind"] == "ft":
            from ft.backends.unsloth import import_unsloth

            import_unsloth()
        else:
            import unsloth  # noqa: F401
    import torch

    record: dict = {"spec": spec, "started": _now()}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            (run_ft if spec["kind"] == "ft" else run_bare)(spec, model_dir, Path(tmp), record)
    except Exception as exc:  # an OOM in the sweep is a result, not a crash
        from ft.sizing.autobatch import is_oom

        record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400]
        record["oom"] = is_oom(exc)
        if not record["oom"]:
            import traceback

            record["traceback"] = traceback.format_exc()[-4000:]
    props = torch.cuda.get_device_properties(0)
    record.update(
        device=props.name,
        device_memory_bytes=props.total_memory,
        cuda=torch.version.cuda,
        versions=_versions(),
        finished=_now(),
    )
    if "t1" in record:
        record["tokens_per_s"] = spec["micro"] * spec["seq"] * spec["steps"] / (record["t1"] - record["t0"])
    result_path.write_text(json.dumps(record, indent=2, default=str))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- orchestration -----------------------------------------------------------------------------------
def predict(spec: dict, gpu_bytes: int | None) -> sizing.SizeEstimate:
    return sizing.estimate(
        spec["model"],
        seq_len=spec["seq"],
        micro_batch=spec["micro"],
        lora_r=LORA_R,
        backend=spec["backend"],
        quantization="nf4",
        dtype="bfloat16",
        gradient_checkpointing=True,
        optimizer="adamw_torch",
        gpu_memory_bytes=gpu_bytes,
    )


def subprocess_env() -> dict:
    """This environment with the checkout first on PYTHONPATH (ft need not be installed)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def call(cmd: list[str], *, timeout: float, env: dict, cwd=None, log: Path | None = None) -> int | None:
    """Run `cmd` in its own process group; on timeout kill the whole group (a worker's children hold GPU
    memory too) and return None, else the exit status. Output goes to `log` (appended) or is inherited."""
    import signal

    out = open(log, "ab") if log else None  # noqa: SIM115  (closed below, after the child exits)
    try:
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None
    finally:
        if out:
            out.close()


def ensure_model(
    preset: str, models_dir: Path, *, env: dict, timeout: float, log: Path | None = None
) -> Path:
    """The random-weight model of `preset` under models_dir, built (GPU, own process) if not there yet."""
    model_dir = models_dir / preset
    if not (model_dir / ".complete").is_file():
        cmd = [sys.executable, __file__, "--build-model", preset, "--model-dir", str(model_dir)]
        rc = call(cmd, timeout=timeout, env=env, log=log)
        if rc != 0:
            why = f"timed out after {timeout:.0f} s" if rc is None else f"exit status {rc}"
            raise RuntimeError(f"building the random-weight {preset} model failed ({why})")
    return model_dir


def run_spec(
    spec: dict, model_dir: Path, path: Path, *, env: dict, timeout: float, log=None, cwd=None
) -> dict:
    """One measurement in its own process; the worker's record, or one that says why there is none."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--model-dir", str(model_dir)]
    rc = call([*cmd, "--result", str(path)], timeout=timeout, env=env, log=log, cwd=cwd)
    if rc is None:
        path.write_text(json.dumps({"spec": spec, "error": f"timeout after {timeout:.0f} s"}))
    elif not path.is_file():
        path.write_text(
            json.dumps({"spec": spec, "error": f"worker died without a result (exit status {rc})"})
        )
    return json.loads(path.read_text())


def run_all(args) -> list[dict]:
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    models_dir = Path(args.models_dir)
    env = subprocess_env()
    results = []
    for spec in plan(args):
        path = out / "runs" / f"{spec['id']}.json"
        if not path.is_file():
            if not (models_dir / spec["model"] / ".complete").is_file():
                print(f"building random-weight {spec['model']} in {models_dir / spec['model']}", flush=True)
            model_dir = ensure_model(spec["model"], models_dir, env=env, timeout=args.timeout)
            print(f"running {spec['id']}", flush=True)
            t = time.perf_counter()
            run_spec(spec, model_dir, path, env=env, timeout=args.timeout)
            print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)
        results.append(json.loads(path.read_text()))
    return results


def collect(args) -> list[dict]:
    """The results already in OUT/runs for the planned runs (a run not there yet is left out)."""
    runs = Path(args.out) / "runs"
    found = [runs / f"{spec['id']}.json" for spec in plan(args)]
    return [json.loads(path.read_text()) for path in found if path.is_file()]


def _gib(x) -> str:
    return "—" if x is None else f"{x / GIB:.2f}"


def sizing_rows(
    results: list[dict] | None, specs: list[dict], gpu_bytes: int | None, groups: tuple[str, ...] = ("sweep",)
) -> list[dict]:
    """`ft size`'s prediction beside the measured peak, one row per `ft` run of the given groups."""
    by_id = {r["spec"]["id"]: r for r in results or []}
    rows = []
    for spec in specs:
        if spec["group"] not in groups or spec["kind"] != "ft":
            continue
        r = by_id.get(spec["id"], {})
        mem = r.get("device_memory_bytes", gpu_bytes)
        est = predict(spec, mem)
        measured = r.get("peak_allocated_bytes")
        rows.append(
            {
                "model": spec["model"],
                "micro_batch": spec["micro"],
                "seq_len": spec["seq"],
                "backend": spec["backend"],
                "predicted_peak_gib": round(est.peak_allocated_bytes / GIB, 3),
                "predicted_total_gib": round(est.total_bytes / GIB, 3),
                "measured_peak_gib": round(measured / GIB, 3) if measured else None,
                "error": round((est.peak_allocated_bytes - measured) / measured, 4) if measured else None,
                "ran": bool(r),
                "oom": r.get("oom"),
                "run_error": r.get("error"),
                "loss_path": r.get("loss_path"),
            }
        )
    return rows


def sizing_table(rows: list[dict], measured: bool) -> str:
    head = "| model | micro × seq | backend | predicted peak GiB | measured peak GiB | error |\n|---|---|---|---:|---:|---:|"
    lines = [head]
    for r in rows:
        if not measured or not r.get("ran", True):
            meas = "not measured"
        elif r["oom"]:
            meas = "OOM"
        else:
            meas = f"{r['measured_peak_gib']:.2f}" if r["measured_peak_gib"] else "failed"
        err = f"{r['error']:+.1%}" if r["error"] is not None else "—"
        lines.append(
            f"| {r['model']} | {r['micro_batch']} × {r['seq_len']} | {r['backend']} | "
            f"{r['predicted_peak_gib']:.2f} | {meas} | {err} |"
        )
    return "\n".join(lines)


def throughput_report(results: list[dict]) -> tuple[list[dict], str]:
    rows, text = [], []
    groups: dict[tuple, dict] = {}
    for r in results:
        s = r["spec"]
        if s["group"] == "throughput":
            groups.setdefault((s["model"], s["micro"], s["seq"]), {})[f"{s['kind']}-{s['backend']}"] = r
    for (model, micro, seq), runs in groups.items():
        shape = sizing.PRESETS[model]
        text.append(f"### {model} shape, micro-batch {micro} × {seq} tokens\n")
        text.append("| path | tokens/s | peak allocated GiB | `ft size` predicted GiB | error | MFU |")
        text.append("|---|---:|---:|---:|---:|---:|")
        for key, label in (
            ("ft-unsloth", "`ft train`, Unsloth"),
            ("ft-hf", "`ft train`, transformers+peft+bnb"),
            ("bare-unsloth", "bare Unsloth + TRL loop"),
        ):
            r = runs.get(key)
            if r is None:
                continue
            tps, peak = r.get("tokens_per_s"), r.get("peak_allocated_bytes")
            est = predict(
                {**r["spec"], "backend": "unsloth" if "unsloth" in key else "hf"},
                r.get("device_memory_bytes"),
            )
            gpu = match_name(r.get("device", ""), r.get("device_memory_bytes") or 0)
            util = None
            if tps and gpu and gpu.bf16_tflops:  # model FLOPs (no recomputation) over the dense bf16 peak
                util = sizing.mfu(shape, seq, tps, gpu.bf16_tflops, lora_params=est.params["lora"])
            err = (est.peak_allocated_bytes - peak) / peak if peak else None
            rows.append(
                {
                    "model": model,
                    "micro_batch": micro,
                    "seq_len": seq,
                    "path": key,
                    "tokens_per_s": tps,
                    "peak_allocated_bytes": peak,
                    "predicted_peak_bytes": est.peak_allocated_bytes,
                    "error": err,
                    "flop_utilisation": util,
                    "run_error": r.get("error"),
                    "loss_path": r.get("loss_path"),
                    "info": r.get("info"),
                }
            )
            if tps and peak:
                util_text = f"{util:.1%}" if util is not None else "—"
                text.append(
                    f"| {label} | {tps:,.0f} | {_gib(peak)} | {_gib(est.peak_allocated_bytes)} | {err:+.1%} | {util_text} |"
                )
            else:
                text.append(
                    f"| {label} | {r.get('error', 'no result')} | | {_gib(est.peak_allocated_bytes)} | | |"
                )
        u, h, b = runs.get("ft-unsloth", {}), runs.get("ft-hf", {}), runs.get("bare-unsloth", {})
        checks = []
        if u.get("tokens_per_s") and h.get("tokens_per_s"):
            speed = u["tokens_per_s"] / h["tokens_per_s"]
            mem = u["peak_allocated_bytes"] / h["peak_allocated_bytes"]
            checks.append(
                f"- Unsloth vs plain: **{speed:.2f}×** tokens/s (target ≥ {SPEEDUP_MIN}×: "
                f"{'met' if speed >= SPEEDUP_MIN else 'NOT met'}), **{mem:.2f}×** peak memory "
                f"(target ≤ {MEMORY_RATIO_MAX}×: {'met' if mem <= MEMORY_RATIO_MAX else 'NOT met'})"
            )
        if u.get("tokens_per_s") and b.get("tokens_per_s"):
            over = 1 - u["tokens_per_s"] / b["tokens_per_s"]
            checks.append(
                f"- ft's overhead over a bare Unsloth loop: **{over:+.1%}** (target < {OVERHEAD_MAX:.0%}: "
                f"{'met' if over < OVERHEAD_MAX else 'NOT met'})"
            )
        text += ["", *checks, ""]
    return rows, "\n".join(text)


def write_reports(args, results: list[dict]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = plan(args)
    first = next((r for r in results if r.get("device")), {})
    srows = sizing_rows(results, specs, first.get("device_memory_bytes"))
    trows, ttext = throughput_report(results)
    errors = [abs(r["error"]) for r in srows if r["error"] is not None]
    measured = any(r.get("peak_allocated_bytes") for r in results)
    header = [
        "# ft GPU benchmark (measured)" if measured else "# ft GPU benchmark: nothing measured yet",
        "",
        f"- device: {first.get('device', 'unknown')} ({_gib(first.get('device_memory_bytes'))} GiB), CUDA {first.get('cuda')}",
        f"- date: {first.get('started', 'unknown')} (UTC)",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in (first.get("versions") or {}).items() if v),
        f"- command: `python benchmarks/bench_gpu.py {' '.join(sys.argv[1:])}`",
        f"- LoRA r={LORA_R}, alpha={LORA_ALPHA}, all seven projections; NF4 base; bf16; gradient checkpointing; "
        "AdamW; random-weight models with the published shapes; synthetic token ids (every token trained)",
        "- MFU: model FLOPs per token (forward + backward input gradients of the frozen base, 6 per LoRA "
        "weight, causal attention; recomputation not counted) x tokens/s / the GPU's dense bf16 peak",
        "- peak: torch.cuda.max_memory_allocated() over the measured steps, after reset_peak_memory_stats()",
        "",
        "## Throughput",
        "",
        ttext,
        "## `ft size`: predicted vs measured peak allocated memory",
        "",
        sizing_table(srows, measured=True),
        "",
        f"Largest |error|: {max(errors):.1%} (target ±{SIZE_ERROR_MAX:.0%})"
        if errors
        else "No sizing point measured.",
        "",
    ]
    (out / "bench.md").write_text("\n".join(header))
    (out / "bench.json").write_text(
        json.dumps({"throughput": trows, "sizing": srows, "runs": results}, indent=2, default=str)
    )
    print("\n".join(header))


def dry_run(args) -> None:
    """CPU: build the model configs and the predicted sizing table; nothing is measured."""
    out = Path(args.out)
    for preset in args.models.split(","):
        write_config(preset, out / "models" / preset)
    gpu = parse_gpu(args.gpu)  # main() has checked it
    specs = plan(args)
    rows = sizing_rows(None, specs, gpu.memory_bytes)
    md = "\n".join(
        [
            f"# `ft size` predictions for the benchmark sweep ({gpu.name}) — not measured",
            "",
            "Predicted peak allocated memory (what `torch.cuda.max_memory_allocated()` would report) for each "
            "point of the sweep. No GPU ran these; the measured column is filled by the real benchmark.",
            "",
            sizing_table(rows, measured=False),
            "",
            "Planned runs: " + ", ".join(s["id"] for s in specs),
            "",
        ]
    )
    (out / "sizing-predicted.md").write_text(md)
    (out / "sizing-predicted.json").write_text(json.dumps({"gpu": gpu.to_dict(), "rows": rows}, indent=2))
    print(md)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where JSON and Markdown go")
    p.add_argument(
        "--models-dir",
        default=str(Path(tempfile.gettempdir()) / "ft-bench-models"),
        help="random-weight models (large; not in --out)",
    )
    p.add_argument("--models", default=",".join(MODELS), help="shapes for the sizing sweep")
    p.add_argument("--sweep-points", default=SWEEP_POINTS, help="micro-batch x sequence length points")
    p.add_argument(
        "--throughput", default=THROUGHPUT_POINTS, help="MODEL:MICROxSEQ points for the speed runs"
    )
    p.add_argument("--steps", type=int, default=6, help="measured steps per throughput run")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps skipped per throughput run")
    p.add_argument("--sweep-steps", type=int, default=2)
    p.add_argument("--sweep-warmup", type=int, default=1)
    p.add_argument("--only", help="comma-separated substrings: run only matching run ids")
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    p.add_argument("--gpu", default="h100", help="GPU for --dry-run predictions")
    p.add_argument("--dry-run", action="store_true", help="CPU only: configs + predicted sizing table")
    p.add_argument("--list", action="store_true", help="print the planned run ids and exit")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="CPU: rebuild bench.json/bench.md from the results already in OUT/runs (runs from several machines)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--build-model", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in args.models.split(","):
        if name not in sizing.PRESETS:
            p.error(f"--models: unknown shape {name!r}; known: {', '.join(sizing.PRESETS)}")
    try:
        parse_gpu(args.gpu)
        plan(args)
    except FtError as exc:
        p.error(str(exc))
    except ValueError as exc:
        p.error(f"--sweep-points / --throughput: {exc} (expected e.g. 4x2048 and qwen2.5-7b:2x2048)")
    if args.worker:
        worker(json.loads(args.worker), Path(args.model_dir), Path(args.result))
    elif args.build_model:
        build_model(args.build_model, Path(args.model_dir))
    elif args.list:
        print("\n".join(s["id"] for s in plan(args)))
    elif args.dry_run:
        dry_run(args)
    elif args.report_only:
        write_reports(args, collect(args))
    else:
        write_reports(args, run_all(args))


if __name__ == "__main__":
    main()
