"""One offline GPU check for a bare GPU box: the GPU tests, `ft run` end to end on both backends, the
7B-shape benchmark beside a bare Unsloth loop, and `ft size` beside measured peaks, in one command that
writes one JSON and one Markdown file.

  (a) tests   pytest -m gpu tests/gpu, one process per test file; pass/fail per test from its JUnit XML
  (b) run     `ft run` (check -> train -> eval -> package) then `ft verify` on the bundle, on Unsloth and
              on transformers+peft+bitsandbytes, with a random-weight Qwen2.5-0.5B-shape model and the tiny
              tokenizer, a few dozen steps
  (c) bench   the 7B shape at 2 x 2048: `ft train`'s loop on both backends and a bare Unsloth + TRL loop
              (ft's overhead), each alone on the GPU (benchmarks/bench_gpu.py's workers)
  (d) size    `ft size`'s predicted peak beside the measured one on 0.5B / 1.5B / 7B shapes, both backends

Every part survives the failure of another: an error is recorded (with the tail of its traceback or
log) and the check goes on. Whatever cannot run here (no CUDA device, a missing module, the time budget)
is listed with the reason in both files. Models have random weights: never read a loss from them as a
quality figure. Jobs of (a), (b), (d) and the model builds share the GPU (at most --jobs at once, within
the memory `ft size` predicts for them; peak allocated memory is per process, so sharing does not change
it); the timed runs of (c) run alone afterwards. Scratch (models: about 17 GB for the 7B shape; runs,
logs) goes to --work, never to --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_gpu as bench  # noqa: E402  (puts the checkout on sys.path; imports no torch)

from ft import sizing  # noqa: E402
from ft.sizing.gpus import GIB, match_name, parse_gpu  # noqa: E402

ROOT = bench.ROOT
PARTS = ("tests", "run", "bench", "size")
TITLES = {
    "tests": "(a) GPU tests",
    "run": "(b) `ft run` end to end, then `ft verify`",
    "bench": "(c) 7B shape at 2 × 2048: Unsloth vs transformers+peft+bnb vs a bare Unsloth loop",
    "size": "(d) `ft size` predicted vs measured peak allocated memory",
}
JSON_NAME, MD_NAME = "gpu-check.json", "gpu-check.md"
DEFAULT_BUDGET_S = 470  # under 8 minutes; a device command may run 10, which leaves room for unpacking
RUN_MODEL = "qwen2.5-0.5b"
# (d) also gets the 7B shape at 2 x 2048 from (c). More points for a second command (they do not fit the
# default budget): --parts size --size-points qwen2.5-1.5b:16x2048,qwen2.5-7b:8x1024
SIZE_POINTS = "qwen2.5-0.5b:4x512,qwen2.5-0.5b:4x1024,qwen2.5-1.5b:4x2048"
MAKE_SITE_EXTRAS = (
    "pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 "
    "referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0 matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 "
    "fonttools==4.68.0 kiwisolver==1.5.1 pyparsing==3.3.3 python-dateutil==4.0.0 tzdata==2026.6 pillow==13.0.0 "
    "pygments==2.21.0"
)
PREAMBLE = (
    "mkdir -p /tmp/site && tar xzf .gpusite/site.tgz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD "
    "HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1"
)
# Seconds each job is expected to take on one H100 (guesses until a GPU run records real ones in the
# JSON's jobs[].duration_s): a job is started only if its guess fits in the budget left.
BUILD_S = {"qwen2.5-0.5b": 20, "qwen2.5-1.5b": 30, "qwen2.5-7b": 80}
MEASURE_S = {"qwen2.5-0.5b": 35, "qwen2.5-1.5b": 45, "qwen2.5-7b": 75}
TESTS_S = {"test_gpu_training": 150, "test_gpu_probe": 100}
RUN_S = 100
JOB_GPU_BYTES = 10 * GIB  # tests and `ft run` jobs on small models, for sharing the GPU
MEMORY_SHARE = 0.85  # jobs that share the GPU keep their predicted totals under this share of it
# What each kind of job imports beyond the GPU box's own torch/transformers/peft/accelerate
FT_MODULES = ("trl", "bitsandbytes", "datasets", "pydantic_settings", "yaml")
RUN_MODULES = (*FT_MODULES, "jsonschema", "matplotlib")
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
TAIL = 4000
BAD = ("failed", "error", "timeout")
OUTCOME = {"skipped": "was skipped", "failed": "failed", "error": "raised an error", "timeout": "timed out"}

EPILOG = f"""\
Offline, on a lent GPU machine (Python 3.12, torch, transformers, peft, accelerate; no package index, no
model hub, no nox):

  1. once, on a development machine, in the project root: the packages the GPU box lacks (about 46 MB)
       echo /.gpusite/ >> .git/info/exclude
       ../shared/gpu/make-site.sh .gpusite {MAKE_SITE_EXTRAS}

  2. one device run with carry [".gpusite"] and timeout 600 s, writing into $OUT (what comes back):
       {PREAMBLE} && python3 benchmarks/gpu_check.py

It writes $OUT/{JSON_NAME} and $OUT/{MD_NAME} (without $OUT: build/gpu-check/) and nothing else there.
The default --budget ({DEFAULT_BUDGET_S} s) is meant to fit one H100 inside one 10-minute command; what does
not fit is listed as skipped, with the reason. On a machine without CUDA it records the environment and
`ft size`'s predictions, and says which parts it skipped and why (--cpu-rehearsal also runs part (b)'s
flow on the tiny model on CPU, to test this script). Exit status 1 when a job failed or errored.
"""


# -- jobs ------------------------------------------------------------------------------------------------
class JobTimeout(Exception):
    pass


@dataclass
class Job:
    """One unit of work, run in a thread that waits on its own subprocess(es)."""

    id: str
    part: str
    work: Callable[[Job, float], dict]  # (job, monotonic deadline) -> details (may set "status": "failed")
    est_s: float
    gpu_bytes: int = 0
    needs: tuple[str, ...] = ()  # jobs that must have succeeded first
    modules: tuple[str, ...] = ()
    alone: bool = False  # timed: runs with nothing else on the GPU
    status: str = "planned"  # ok | failed | error | timeout | skipped
    reason: str | None = None
    details: dict = field(default_factory=dict)
    started_s: float | None = None
    duration_s: float | None = None
    sharing_with: int = 0  # other jobs running when it started

    def skip(self, reason: str) -> None:
        self.status, self.reason = "skipped", reason

    def to_dict(self) -> dict:
        out = {
            "id": self.id,
            "part": self.part,
            "status": self.status,
            "reason": self.reason,
            "estimated_s": self.est_s,
            "started_s": self.started_s,
            "duration_s": self.duration_s,
            "sharing_gpu_with": self.sharing_with,
        }
        return {**out, **{k: v for k, v in self.details.items() if k != "record"}}


def execute(job: Job, deadline: float, t0: float, injected: set[str]) -> None:
    """Run one job, turning whatever goes wrong into its status (never raises)."""
    start = time.monotonic()
    job.started_s = round(start - t0, 1)
    try:
        if job.part in injected:
            raise RuntimeError(f"injected failure (--inject-failure {job.part})")
        details = job.work(job, deadline) or {}
        job.status = details.pop("status", "ok")
        job.details.update(details)
    except JobTimeout as exc:
        job.status, job.reason = "timeout", str(exc)
    except Exception as exc:
        job.status = "error"
        job.details.update(
            error=f"{type(exc).__name__}: {exc}"[:1000], traceback=traceback.format_exc()[-TAIL:]
        )
    finally:
        job.duration_s = round(time.monotonic() - start, 1)


def schedule(
    jobs: list[Job],
    *,
    lanes: int,
    deadline: float,
    gpu_bytes: int | None,
    t0: float,
    injected: set[str],
    by_id: dict[str, Job],
) -> None:
    """Run `jobs` in list order, at most `lanes` at once and never beside an `alone` job, admitting a job
    only while the GPU memory predicted for what runs stays under MEMORY_SHARE of the card. A job whose
    prerequisite did not succeed, or whose time guess no longer fits before `deadline`, is skipped."""
    pending = [j for j in jobs if j.status == "planned"]
    running: dict = {}
    cap = MEMORY_SHARE * gpu_bytes if gpu_bytes else None
    with ThreadPoolExecutor(max_workers=max(1, lanes)) as pool:
        while pending or running:
            now = time.monotonic()
            for job in list(pending):
                bad = next((d for d in job.needs if by_id[d].status not in ("planned", "ok")), None)
                if bad:
                    job.skip(f"needs {bad}, which {OUTCOME[by_id[bad].status]}")
                elif now + job.est_s > deadline:
                    job.skip(
                        f"time budget: needs about {job.est_s:.0f} s, {max(0.0, deadline - now):.0f} s left"
                    )
                else:
                    continue
                pending.remove(job)
            for job in list(pending):
                if len(running) >= lanes or any(r.alone for r in running.values()):
                    break
                if any(by_id[d].status != "ok" for d in job.needs):
                    continue
                if running and job.alone:
                    break  # it waits for the GPU to itself; later jobs wait behind it
                in_use = sum(r.gpu_bytes for r in running.values())
                if running and cap and in_use + job.gpu_bytes > cap:
                    continue
                job.sharing_with = len(running)
                running[pool.submit(execute, job, deadline, t0, injected)] = job
                pending.remove(job)
            if running:
                done, _ = wait(list(running), timeout=1.0, return_when=FIRST_COMPLETED)
                for fut in done:
                    running.pop(fut)
            elif pending:  # nothing runs and nothing can start: prerequisites outside this list
                for job in pending:
                    job.skip("its prerequisites never ran")
                pending.clear()


# -- the context every job works in ------------------------------------------------------------------------
@dataclass
class Context:
    args: argparse.Namespace
    work: Path
    env: dict
    device: dict
    cuda: bool
    gpu_bytes: int | None

    @property
    def models(self) -> Path:
        return self.work / "models"

    def cwd(self, job: Job) -> Path:
        """Each job's own working folder: Unsloth writes its compiled-module cache into the current one."""
        path = self.work / "cwd" / job.id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log(self, job: Job) -> Path:
        path = self.work / "logs" / f"{job.id}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def call(self, job: Job, cmd: list[str], deadline: float, cwd: Path | None = None) -> int:
        left = deadline - time.monotonic()
        if left < 5:
            raise JobTimeout("no time left in the budget")
        rc = bench.call(cmd, timeout=left, env=self.env, cwd=cwd, log=self.log(job))
        if rc is None:
            job.details["log_tail"] = log_tail(self.log(job))
            raise JobTimeout(f"killed at the budget's end after {left:.0f} s: {' '.join(cmd[1:4])} ...")
        return rc


def log_tail(path: Path, n: int = TAIL) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


# -- (a) the GPU tests ---------------------------------------------------------------------------------------
def junit_cases(path: Path) -> list[dict]:
    """Per test: outcome (passed/failed/error/skipped), message, time, and a failure's text tail."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        row = {
            "test": case.get("name"),
            "file": case.get("classname"),
            "time_s": float(case.get("time") or 0),
        }
        row["outcome"] = "passed"
        for tag, outcome in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            el = case.find(tag)
            if el is not None:
                row["outcome"], row["message"] = outcome, (el.get("message") or "")[:500]
                if outcome != "skipped":
                    row["text_tail"] = (el.text or "")[-TAIL:]
                break
        cases.append(row)
    return cases


def tests_job(ctx: Context, path: Path) -> Job:
    def work(job: Job, deadline: float) -> dict:
        xml = ctx.work / "junit" / f"{path.stem}.xml"
        xml.parent.mkdir(parents=True, exist_ok=True)
        xml.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", str(path), f"--rootdir={ROOT}", "-rA", "-q"]
        rc = ctx.call(job, [*cmd, "-p", "no:cacheprovider", f"--junitxml={xml}"], deadline, cwd=ctx.cwd(job))
        out = {"exit_status": rc, "cases": junit_cases(xml) if xml.is_file() else []}
        if rc != 0:
            bad = [
                f"{c['test']}: {c['outcome']}" for c in out["cases"] if c["outcome"] in ("failed", "error")
            ]
            why = "; ".join(bad) if bad else "no per-test result (see the log tail)"
            out.update(
                status="failed", error=f"pytest exit status {rc}: {why}", log_tail=log_tail(ctx.log(job))
            )
        return out

    est = TESTS_S.get(path.stem, 120)
    return Job(f"tests-{path.stem}", "tests", work, est, JOB_GPU_BYTES, modules=("pytest", *FT_MODULES))


# -- (b) ft run end to end -------------------------------------------------------------------------------------
def recipe(backend: str, model: str, *, cpu: bool, steps: int) -> dict:
    train = {
        "backend": backend,
        "device": "cpu" if cpu else "cuda",
        "max_seq_length": 128 if cpu else 512,
        "micro_batch": 8 if cpu else "auto",
        "effective_batch": 8,
        "max_steps": steps,
        "save_every": max(1, steps // 2),
        "log_every": 1,
    }
    if not cpu:
        train["learning_rate"] = 2e-4
    return {
        "name": f"gpu-check-{backend}",
        "model": {"name_or_path": model}
        | ({"quantization": "none", "dtype": "float32"} if cpu else {"quantization": "nf4", "dtype": "auto"}),
        "train": train,
        "data": {"train": ["builtin:tickets.jsonl"], "eval_max_rows": 8},
        "eval": {"max_examples": 8, "max_new_tokens": 32, "batch_size": 8},
        "output": {"dir": "runs", "run_name": backend, "bundle_dir": "bundles"},
    }


def run_job(ctx: Context, backend: str, *, cpu: bool = False) -> Job:
    def work(job: Job, deadline: float) -> dict:
        wd = ctx.work / job.id
        shutil.rmtree(wd, ignore_errors=True)
        wd.mkdir(parents=True)
        model = "builtin:tiny-qwen2" if cpu else str(ctx.models / RUN_MODEL)
        steps = ctx.args.cpu_steps if cpu else ctx.args.run_steps
        # JSON is YAML: no yaml import needed here
        (wd / "recipe.yaml").write_text(json.dumps(recipe(backend, model, cpu=cpu, steps=steps), indent=2))
        out: dict = {"backend": backend, "model": "tiny (CPU rehearsal)" if cpu else f"{RUN_MODEL} shape"}
        t = time.monotonic()
        rc = ctx.call(job, [sys.executable, "-m", "ft", "run", "--recipe", "recipe.yaml"], deadline, cwd=wd)
        out.update(ft_run_exit=rc, ft_run_s=round(time.monotonic() - t, 1))
        run_dir = wd / "runs" / backend
        if (run_dir / "run.json").is_file():
            meta = json.loads((run_dir / "run.json").read_text())
            train = meta.get("train") or {}
            out.update(
                status_in_run_json=meta.get("status"),
                backend_used=meta.get("backend"),
                device=meta.get("device"),
                steps=train.get("steps"),
                micro_batch=train.get("micro_batch"),
                grad_accum=train.get("grad_accum"),
                train_runtime_s=train.get("runtime_s"),
                train_info=train.get("info"),
                verdict=meta.get("verdict"),
            )
        report = run_dir / "eval" / "report.json"
        if report.is_file():
            rep = json.loads(report.read_text())
            out["eval"] = {"backend": rep.get("backend"), "generation": rep.get("generation")}
        if rc != 0:
            return {
                **out,
                "status": "failed",
                "error": f"ft run: exit status {rc}",
                "log_tail": log_tail(ctx.log(job)),
            }
        archives = sorted((wd / "bundles").glob("*.tar.gz"))
        if not archives:
            return {**out, "status": "failed", "error": "ft run left no bundle archive"}
        vrc = ctx.call(job, [sys.executable, "-m", "ft", "verify", str(archives[-1])], deadline, cwd=wd)
        out.update(bundle=archives[-1].name, verify_exit=vrc)
        if vrc != 0:
            return {
                **out,
                "status": "failed",
                "error": f"ft verify: exit status {vrc}",
                "log_tail": log_tail(ctx.log(job)),
            }
        return out

    needs = () if cpu else (f"model-{RUN_MODEL}",)
    modules = (*RUN_MODULES, "unsloth") if backend == "unsloth" else RUN_MODULES
    if cpu:  # no 4-bit base on CPU
        modules = tuple(m for m in modules if m != "bitsandbytes")
    name = f"run-{backend}" + ("-cpu-rehearsal" if cpu else "")
    return Job(name, "run", work, 60 if cpu else RUN_S, JOB_GPU_BYTES, needs=needs, modules=modules)


# -- (c), (d): bench_gpu's workers ------------------------------------------------------------------------------
def measure_job(ctx: Context, spec: dict, part: str) -> Job:
    def work(job: Job, deadline: float) -> dict:
        left = deadline - time.monotonic()
        if left < 5:
            raise JobTimeout("no time left in the budget")
        path = ctx.work / "results" / f"{spec['id']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        record = bench.run_spec(
            spec,
            ctx.models / spec["model"],
            path,
            env=ctx.env,
            timeout=left,
            log=ctx.log(job),
            cwd=ctx.cwd(job),
        )
        out = {"record": record, "oom": record.get("oom")}
        if str(record.get("error", "")).startswith("timeout"):
            job.details["log_tail"] = log_tail(ctx.log(job))
            raise JobTimeout(f"killed at the budget's end: {record['error']}")
        if record.get("error") and not record.get("oom"):  # an OOM is a result, not a failure
            out.update(status="failed", error=record["error"], traceback=record.get("traceback"))
            out["log_tail"] = log_tail(ctx.log(job))
        return out

    mem = bench.predict(spec, ctx.gpu_bytes).total_bytes if ctx.gpu_bytes else JOB_GPU_BYTES
    modules = (*FT_MODULES, "unsloth") if spec["backend"] == "unsloth" else FT_MODULES
    return Job(
        spec["id"],
        part,
        work,
        MEASURE_S.get(spec["model"], 90),
        int(mem * 1.2),
        needs=(f"model-{spec['model']}",),
        modules=modules,
        alone=part == "bench",
    )


def build_job(ctx: Context, preset: str) -> Job:
    def work(job: Job, deadline: float) -> dict:
        left = deadline - time.monotonic()
        if left < 5:
            raise JobTimeout("no time left in the budget")
        bench.ensure_model(preset, ctx.models, env=ctx.env, timeout=left, log=ctx.log(job))
        return {}

    weights = sizing.PRESETS[preset].total_params() * 2  # built in bf16 on the GPU
    return Job(f"model-{preset}", "models", work, BUILD_S.get(preset, 100), int(weights * 1.2))


def throughput_specs(args) -> list[dict]:
    out = []
    for model, micro, seq in bench._throughput(args.throughput):
        for kind, backend in (("ft", "unsloth"), ("ft", "hf"), ("bare", "unsloth")):
            out.append(
                bench.make_spec("throughput", kind, backend, model, micro, seq, args.warmup, args.steps)
            )
    return out


def size_specs(args) -> list[dict]:
    out = []
    for part in args.size_points.split(","):
        model, micro, seq = bench._throughput(part)[0]
        for backend in ("unsloth", "hf"):
            out.append(
                bench.make_spec(
                    "sweep", "ft", backend, model, micro, seq, args.sweep_warmup, args.sweep_steps
                )
            )
    return out


def plan_jobs(ctx: Context, *, check_modules: bool = True) -> list[Job]:
    """Every job of the selected parts in priority order (model builds, (b), (a), (d), then the timed
    (c)), those that cannot run here already skipped with the reason."""
    args, jobs = ctx.args, []
    if "run" in args.parts:
        jobs.append(run_job(ctx, "unsloth"))
        jobs.append(run_job(ctx, "hf", cpu=not ctx.cuda and args.cpu_rehearsal))
    if "tests" in args.parts:
        files = sorted((ROOT / "tests" / "gpu").glob("test_*.py"), key=lambda p: -TESTS_S.get(p.stem, 120))
        jobs += [tests_job(ctx, p) for p in files]
    if "size" in args.parts:
        jobs += [measure_job(ctx, s, "size") for s in size_specs(args)]
    if "bench" in args.parts:
        jobs += [measure_job(ctx, s, "bench") for s in throughput_specs(args)]
    no_gpu = f"no CUDA device ({ctx.device.get('why') or 'torch.cuda.is_available() is False'})"
    for job in jobs:
        gone = missing(job.modules) if check_modules else []
        if not ctx.cuda and not job.id.endswith("cpu-rehearsal"):
            hint = (
                " (--cpu-rehearsal runs this part's flow on the tiny model on CPU)"
                if job.part == "run"
                else ""
            )
            job.skip(f"needs a CUDA GPU: {no_gpu}{hint}")
        elif gone:
            job.skip(f"missing modules {', '.join(gone)}: build the carried site as --help says")
    wanted = {n.removeprefix("model-") for j in jobs if j.status == "planned" for n in j.needs}
    return [build_job(ctx, m) for m in bench.MODELS if m in wanted] + jobs


# -- the environment ------------------------------------------------------------------------------------------
DEVICE_PROBE = """
import json, torch
from ft.manifest import gpu_facts
out = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
out.update(gpu_facts(with_torch=True))
print(json.dumps(out))
"""


def probe_device(env: dict) -> dict:
    """torch's view of the GPU, from a child process: this one never initialises CUDA (it would hold memory
    on the card the jobs measure)."""
    done = subprocess.run(
        [sys.executable, "-c", DEVICE_PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        return {"cuda_available": False, "why": f"the device probe failed: {done.stderr.strip()[-300:]}"}
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    first = (facts.get("devices") or [{}])[0]
    facts.update(name=first.get("name"), memory_bytes=first.get("memory_bytes"))
    return facts


def versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in (*bench.DISTS, "triton", "xformers", "pytest", "jsonschema", "matplotlib", "ft"):
        try:
            out[dist] = metadata.version(dist.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def environment(env: dict) -> tuple[dict, dict]:
    from ft.manifest import git_commit

    device = probe_device(env)
    try:
        commit = git_commit()
    except Exception:
        commit = None
    facts = {
        "python": sys.version.split()[0],
        "platform": sys.platform,
        "cpu_count": os.cpu_count(),
        "git_commit": commit,
        "versions": versions(),
        "modules_missing": missing(tuple(dict.fromkeys((*RUN_MODULES, "unsloth", "pytest")))),
    }
    return device, facts


# -- summaries ---------------------------------------------------------------------------------------------------
def part_status(jobs: list[Job]) -> tuple[str, str | None]:
    if not jobs:
        return "skipped", "no jobs"
    if all(j.status == "skipped" for j in jobs):
        return "skipped", "; ".join(dict.fromkeys(j.reason or "" for j in jobs))
    if any(j.status in BAD for j in jobs):
        return "failed", None
    return ("partial" if any(j.status == "skipped" for j in jobs) else "ok"), None


def summarise_tests(ctx: Context, jobs: list[Job]) -> dict:
    cases = [dict(c, job=j.id) for j in jobs for c in j.details.get("cases", [])]
    counts: dict[str, int] = {}
    for c in cases:
        counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
    return {"cases": cases, "counts": counts}


def summarise_run(ctx: Context, jobs: list[Job]) -> dict:
    return {"runs": [j.to_dict() for j in jobs]}


def _records(jobs: list[Job]) -> list[dict]:
    return [j.details["record"] for j in jobs if "record" in j.details]


def summarise_bench(ctx: Context, jobs: list[Job]) -> dict:
    specs = throughput_specs(ctx.args)
    records = _records(jobs)
    rows, text = bench.throughput_report(records) if records else ([], "")
    predicted = [
        {
            "model": s["model"],
            "micro_batch": s["micro"],
            "seq_len": s["seq"],
            "path": f"{s['kind']}-{s['backend']}",
            "predicted_peak_gib": round(
                bench.predict(s, ctx.gpu_bytes or ctx.args.gpu_bytes).peak_allocated_bytes / GIB, 3
            ),
        }
        for s in specs
    ]
    eta = eta_calibration(rows, ctx.device)
    return {"rows": rows, "markdown": text, "predicted": predicted, "eta": eta}


def eta_calibration(rows: list[dict], device: dict) -> dict:
    """The FLOP utilisation `ft size`'s time estimate assumes beside the one measured here, by the ETA's
    own definition (tokens/s x 6 x parameters over the GPU's bf16 matmul peak)."""
    assumed = getattr(sizing, "MEASURED_FLOP_UTILISATION", None) or getattr(
        sizing, "ASSUMED_FLOP_UTILISATION", {}
    )
    fraction = getattr(sizing, "MATMUL_PEAK_FRACTION", 1.0)
    out = {
        "assumed_flop_utilisation": dict(assumed),
        "assumed_from": getattr(sizing, "UTILISATION_SOURCE", None),
        "definition": "tokens/s x 6 x parameters / (datasheet dense bf16 peak x sizing.MATMUL_PEAK_FRACTION)",
        "measured": {},
    }
    gpu = match_name(device.get("name") or "", device.get("memory_bytes") or 0)
    for r in rows:
        backend = r["path"].removeprefix("ft-")
        if backend not in ("unsloth", "hf") or not r.get("tokens_per_s") or not (gpu and gpu.bf16_tflops):
            continue
        six_n = 6 * sizing.PRESETS[r["model"]].total_params()
        peak = gpu.bf16_tflops * 1e12 * fraction
        entry = {"tokens_per_s": r["tokens_per_s"], "flop_utilisation": r["tokens_per_s"] * six_n / peak}
        if backend in assumed:
            entry["eta_tokens_per_s"] = peak * assumed[backend] / six_n
        out["measured"][backend] = entry
    return out


def summarise_size(ctx: Context, jobs: list[Job], bench_jobs: list[Job]) -> dict:
    records = _records(jobs) + _records(bench_jobs)
    specs = size_specs(ctx.args) + (throughput_specs(ctx.args) if bench_jobs else [])
    rows = bench.sizing_rows(
        records, specs, ctx.gpu_bytes or ctx.args.gpu_bytes, groups=("sweep", "throughput")
    )
    errors = [abs(r["error"]) for r in rows if r["error"] is not None]
    return {
        "rows": rows,
        "max_abs_error": max(errors) if errors else None,
        "target": bench.SIZE_ERROR_MAX,
        "predicted_for": ctx.device.get("name") or ctx.args.gpu,
    }


def guarded(name: str, injected: set[str], fn: Callable[[], dict]) -> dict:
    """A part's summary, or its error: one part's failure never stops another."""
    try:
        if name in injected:
            raise RuntimeError(f"injected failure (--inject-failure {name})")
        return fn()
    except Exception as exc:
        return {
            "status": "error",
            "error": f"{type(exc).__name__}: {exc}"[:1000],
            "traceback": traceback.format_exc()[-TAIL:],
        }


# -- the check ---------------------------------------------------------------------------------------------------
def check(args) -> dict:
    t0 = time.monotonic()
    injected = set(args.inject_failure or [])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**bench.subprocess_env(), **OFFLINE, "FT_CACHE": str(work / "ft-cache")}
    report: dict = {
        "tool": "benchmarks/gpu_check.py",
        "format": 1,
        "command": " ".join(["python benchmarks/gpu_check.py", *args.argv]),
        "started": _now(),
        "budget_s": args.budget,
        "parts_selected": list(args.parts),
    }
    env_part = guarded("env", injected, lambda: dict(zip(("device", "facts"), environment(env), strict=True)))
    device = env_part.get("device") or {"cuda_available": False, "why": "the environment check failed"}
    report["device"] = device
    report["environment"] = env_part.get("facts") or {}
    cuda = bool(device.get("cuda_available"))
    ctx = Context(args, work, env, device, cuda, device.get("memory_bytes") if cuda else None)

    plan_part = guarded("plan", injected, lambda: {"jobs": plan_jobs(ctx)})
    jobs = plan_part.get("jobs", [])
    by_id = {j.id: j for j in jobs}
    shared = [j for j in jobs if not j.alone]
    timed = [j for j in jobs if j.alone]
    end = t0 + args.budget
    # The shared phase leaves the timed runs their time, but never less than their models need to build
    planned = [j for j in timed if j.status == "planned"]
    reserve = sum(j.est_s for j in planned)
    builds = max((by_id[n].est_s for j in planned for n in j.needs if n in by_id), default=0)
    shared_end = min(end - 5, max(end - reserve - 10, time.monotonic() + builds + 5))
    kw = {"gpu_bytes": ctx.gpu_bytes, "t0": t0, "injected": injected, "by_id": by_id}
    schedule(shared, lanes=args.jobs, deadline=shared_end, **kw)
    schedule(timed, lanes=1, deadline=end - 5, **kw)

    of = {p: [j for j in jobs if j.part == p] for p in (*PARTS, "models")}
    summaries = {
        "tests": lambda: summarise_tests(ctx, of["tests"]),
        "run": lambda: summarise_run(ctx, of["run"]),
        "bench": lambda: summarise_bench(ctx, of["bench"]),
        "size": lambda: summarise_size(ctx, of["size"], of["bench"]),
    }
    parts = {}
    for name in PARTS:
        if name not in args.parts:
            parts[name] = {"status": "skipped", "reason": "not selected (--parts)"}
            continue
        status, reason = part_status(of[name])
        parts[name] = {"status": status, "reason": reason, "jobs": [j.id for j in of[name]]}
        summary = guarded(name, injected, summaries[name])
        if summary.get("status") == "error":
            parts[name] = {
                "status": "error",
                "reason": f"its jobs: {status}" + (f" ({reason})" if reason else ""),
                **{k: parts[name][k] for k in ("jobs",)},
                "error": summary["error"],
                "traceback": summary["traceback"],
            }
        else:
            parts[name].update(summary)
    report["parts"] = parts
    report["jobs"] = [j.to_dict() for j in jobs]
    report["skipped"] = skipped(parts, jobs)
    report["errors"] = [
        {
            "what": j.id,
            "status": j.status,
            "error": j.details.get("error") or j.reason,
            "tail": j.details.get("traceback") or j.details.get("log_tail"),
        }
        for j in jobs
        if j.status in BAD
    ] + [
        {"what": f"part {n}", "status": "error", "error": p["error"], "tail": p["traceback"]}
        for n, p in {**parts, "env": env_part, "plan": plan_part}.items()
        if p.get("status") == "error"
    ]
    report["finished"] = _now()
    report["wall_s"] = round(time.monotonic() - t0, 1)
    report["measured"] = any(j.status == "ok" and j.part in ("bench", "size") for j in jobs)
    return report


def skipped(parts: dict, jobs: list[Job]) -> list[dict]:
    """What did not run and why: whole parts, then the jobs of the other parts, grouped by reason."""
    out = [{"what": f"part {n}", "reason": p["reason"]} for n, p in parts.items() if p["status"] == "skipped"]
    whole = {n for n, p in parts.items() if p["status"] == "skipped"}
    groups: dict[tuple[str, str], list[str]] = {}
    for j in jobs:
        if j.status == "skipped" and j.part not in whole:
            groups.setdefault((j.part, j.reason or ""), []).append(j.id)
    return out + [{"what": ", ".join(ids), "reason": reason} for (_, reason), ids in groups.items()]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- the Markdown report ---------------------------------------------------------------------------------------------
def _gib(x) -> str:
    return "—" if x is None else f"{x / GIB:.2f}"


def render(report: dict) -> str:
    dev, facts = report["device"], report.get("environment") or {}
    vers = facts.get("versions") or {}
    cuda = dev.get("cuda_available")
    title = "# ft GPU check" + ("" if report.get("measured") else ": no GPU figure measured")
    out = [
        title,
        "",
        f"- device: {dev.get('name') or 'none'}"
        + (
            f" ({_gib(dev.get('memory_bytes'))} GiB, capability {((dev.get('devices') or [{}])[0]).get('capability')}, "
            f"driver {dev.get('driver')}, CUDA {dev.get('cuda_build')})"
            if cuda
            else f": {dev.get('why') or 'torch.cuda.is_available() is False'} (torch {dev.get('torch')})"
        ),
        f"- date: {report['started']} to {report.get('finished')} (UTC), {report.get('wall_s')} s of a {report['budget_s']} s budget",
        f"- command: `{report['command'].strip()}`",
        f"- Python {facts.get('python')}, ft commit {facts.get('git_commit') or 'unknown'}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in vers.items() if v),
        "- not installed: " + (", ".join(k for k, v in vers.items() if not v) or "nothing listed"),
        "- models have random weights: no loss here is a quality figure",
        "",
    ]
    if report.get("skipped"):
        out += ["## Skipped, and why", ""]
        out += [f"- **{s['what']}**: {s['reason']}" for s in report["skipped"]]
        out.append("")
    parts = report["parts"]
    for name in PARTS:
        p = parts[name]
        out += [
            f"## {TITLES[name]}",
            "",
            f"Status: **{p['status']}**" + (f" ({p['reason']})" if p.get("reason") else ""),
            "",
        ]
        if p["status"] == "error":
            out += [f"Error: `{p['error']}`", ""]
            continue
        out += RENDER[name](p)
    if report.get("errors"):
        out += ["## Errors", ""]
        for e in report["errors"]:
            out += [f"### {e['what']}: {e['status']}", "", str(e.get("error")), ""]
            if e.get("tail"):
                out += ["```", e["tail"].rstrip()[-2500:], "```", ""]
    return "\n".join(out) + "\n"


def _render_tests(p: dict) -> list[str]:
    cases = p.get("cases") or []
    if not cases:
        return []
    out = ["| test | outcome | time s | message |", "|---|---|---:|---|"]
    for c in cases:
        msg = (c.get("message") or "").replace("|", "\\|").replace("\n", " ")[:160]
        out.append(f"| `{c['file']}::{c['test']}` | {c['outcome']} | {c['time_s']:.1f} | {msg} |")
    counts = ", ".join(f"{v} {k}" for k, v in sorted((p.get("counts") or {}).items()))
    return [*out, "", f"Totals: {counts}", ""]


def _render_run(p: dict) -> list[str]:
    runs = [r for r in p.get("runs") or [] if r["status"] != "skipped"]
    if not runs:
        return []
    out = [
        "| job | status | model | steps | micro × accum | `ft run` s | verdict | `ft verify` | backend info |",
        "|---|---|---|---:|---|---:|---|---|---|",
    ]
    for r in runs:
        info = r.get("train_info") or {}
        keys = ("unsloth", "gradient_checkpointing", "patched", "quantization", "dtype")
        brief = "; ".join(f"{k}={info[k]}" for k in keys if k in info)
        verify = {None: "—", 0: "PASS"}.get(r.get("verify_exit"), f"exit {r.get('verify_exit')}")
        cell = {
            k: "—" if r.get(k) is None else r[k] for k in ("steps", "micro_batch", "grad_accum", "ft_run_s")
        }
        out.append(
            f"| {r['id']} | {r['status']} | {r.get('model')} | {cell['steps']} | {cell['micro_batch']} × "
            f"{cell['grad_accum']} | {cell['ft_run_s']} | {r.get('verdict') or '—'} | {verify} | {brief} |"
        )
    return [*out, ""]


def _render_bench(p: dict) -> list[str]:
    out = []
    if p.get("markdown"):
        out += [p["markdown"], ""]
    else:
        out += [
            "Not measured. `ft size`'s predicted peaks for these runs:",
            "",
            "| run | predicted peak GiB |",
            "|---|---:|",
        ]
        out += [
            f"| {r['path']} {r['model']} {r['micro_batch']} × {r['seq_len']} | {r['predicted_peak_gib']:.2f} |"
            for r in p.get("predicted", [])
        ]
        out.append("")
    eta = p.get("eta") or {}
    assumed = ", ".join(f"{k} {v:.0%}" for k, v in (eta.get("assumed_flop_utilisation") or {}).items())
    out.append(
        f"`ft size`'s time estimate assumes FLOP utilisation {assumed or 'unknown'} "
        f"({eta.get('assumed_from') or 'source unknown'}; {eta.get('definition')})."
    )
    for backend, m in (eta.get("measured") or {}).items():
        eta_tps = f"{m['eta_tokens_per_s']:,.0f}" if m.get("eta_tokens_per_s") else "—"
        out.append(
            f"- measured here, {backend}: {m['flop_utilisation']:.0%} ({m['tokens_per_s']:,.0f} tokens/s; the "
            f"estimate assumes {eta_tps})"
        )
    return [*out, ""]


def _render_size(p: dict) -> list[str]:
    rows = p.get("rows") or []
    measured = any(r.get("ran") for r in rows)
    out = [f"Predictions for {p.get('predicted_for')}.", "", bench.sizing_table(rows, measured=measured), ""]
    if p.get("max_abs_error") is not None:
        out += [f"Largest |error|: {p['max_abs_error']:.1%} (target ±{p['target']:.0%})", ""]
    return out


RENDER = {"tests": _render_tests, "run": _render_run, "bench": _render_bench, "size": _render_size}


def anonymise(text: str, work: Path) -> str:
    """Tracebacks and logs name this machine's folders; the files may be committed, the folders may not."""
    for path, name in ((work.resolve(), "<work>"), (ROOT, "<checkout>"), (Path.home(), "~")):
        if len(str(path)) > 1:
            text = text.replace(str(path), name)
    return text


def write(report: dict, out_dir: Path, work: Path) -> None:
    """Exactly two files in out_dir: the JSON report and its Markdown rendering."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / JSON_NAME).write_text(anonymise(json.dumps(report, indent=2, default=str), work))
    (out_dir / MD_NAME).write_text(anonymise(render(report), work))


# -- command line ----------------------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gpu_check.py",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    default_out = os.environ.get("OUT") or str(ROOT / "build" / "gpu-check")
    p.add_argument(
        "--out",
        default=default_out,
        help=f"where {JSON_NAME} and {MD_NAME} go (default: $OUT, else build/gpu-check)",
    )
    p.add_argument(
        "--work",
        default=str(Path(tempfile.gettempdir()) / "ft-gpu-check"),
        help="scratch: models, runs, logs",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="seconds for the whole check (default %(default)s)",
    )
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated, of: " + ", ".join(PARTS))
    p.add_argument(
        "--jobs", type=int, default=4, help="jobs of (a), (b), (d) sharing the GPU at once (default 4)"
    )
    p.add_argument("--run-steps", type=int, default=30, help="training steps of each `ft run` (b)")
    p.add_argument("--throughput", default=bench.THROUGHPUT_POINTS, help="MODEL:MICROxSEQ points of (c)")
    p.add_argument("--steps", type=int, default=6, help="measured steps per throughput run (c)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps skipped per throughput run (c)")
    p.add_argument(
        "--size-points", default=SIZE_POINTS, help="MODEL:MICROxSEQ points of (d), both backends each"
    )
    p.add_argument("--sweep-steps", type=int, default=2, help="measured steps per point of (d)")
    p.add_argument("--sweep-warmup", type=int, default=1)
    p.add_argument("--gpu", default="h100", help="GPU the predictions are for when none is present")
    p.add_argument(
        "--cpu-rehearsal", action="store_true", help="without CUDA: run (b)'s flow on the tiny model on CPU"
    )
    p.add_argument("--cpu-steps", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--plan", action="store_true", help="print the jobs and their time guesses, run nothing")
    p.add_argument("--inject-failure", action="append", metavar="PART", help=argparse.SUPPRESS)  # tests
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.parts = tuple(x.strip() for x in args.parts.split(",") if x.strip())
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"--parts: unknown {', '.join(unknown)}; known: {', '.join(PARTS)}")
    try:
        args.gpu_bytes = parse_gpu(args.gpu).memory_bytes
        throughput_specs(args), size_specs(args)
    except Exception as exc:
        p.error(f"--gpu / --throughput / --size-points: {exc} (expected e.g. h100 and qwen2.5-7b:2x2048)")
    if args.budget <= 0 or args.jobs < 1:
        p.error("--budget and --jobs must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.plan:
        ctx = Context(args, Path(args.work), {}, {"cuda_available": True}, True, args.gpu_bytes)
        jobs = plan_jobs(ctx, check_modules=False)
        for job in jobs:
            after = f" after {', '.join(job.needs)}" if job.needs else ""
            print(f"{job.id:48} {job.part:7} ~{job.est_s:4.0f} s{' alone' if job.alone else ''}{after}")
        shared = sum(j.est_s for j in jobs if not j.alone)
        timed = sum(j.est_s for j in jobs if j.alone)
        print(
            f"guesses for one H100: {shared:.0f} s of shared jobs over --jobs {args.jobs}, then {timed:.0f} s "
            f"of timed ones; budget {args.budget:.0f} s (jobs that no longer fit are skipped, with the reason)"
        )
        return 0
    report = check(args)
    write(report, Path(args.out), Path(args.work))
    print(anonymise(render(report), Path(args.work)))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
