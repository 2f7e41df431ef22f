"""The loop, one stage per function: check -> train -> eval -> package.

The CLI calls these; each stage reads what the previous one left in the run directory, so `ft train`,
`ft eval` and `ft package` can also be run one at a time (and `ft run` is just all of them).

A run directory is created only after the recipe and the data have passed their checks, so bad input
never leaves a half-made run behind.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ft.errors import FtError
from ft.fsutil import atomic_dir, sha256_file, write_json, write_text
from ft.manifest import capture, utc_now

RUN_FILE = "run.json"


@dataclass
class Prepared:
    settings: Any
    check: Any  # ft.data.CheckResult
    tokenizer: Any
    data_sha256: str


def data_sha256(report: dict[str, Any]) -> str:
    """One hash for "the data this run trained on": file contents plus the held-out split."""
    key = {
        "files": sorted((f.get("role", ""), f["sha256"]) for f in report.get("files", [])),
        "split": report.get("split", {}).get("eval_ids"),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def check_data(settings, tokenizer=None) -> Prepared:
    from ft import data
    from ft.modelref import load_tokenizer

    m = settings.model
    tok = tokenizer or load_tokenizer(m.name_or_path, m.revision, m.trust_remote_code)
    result = data.check(settings, tokenizer=tok)
    return Prepared(settings, result, tok, data_sha256(result.report))


def run_name(settings, digest: str) -> str:
    if settings.output.run_name:
        return settings.output.run_name
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{settings.name}-{stamp}-{digest[:8]}"


def find_resumable_run(settings) -> Path | None:
    """The newest unfinished run of this recipe under output.dir (for `--resume auto`)."""
    root = Path(settings.output.dir)
    if settings.output.run_name:
        candidate = root / settings.output.run_name
        return candidate if (candidate / RUN_FILE).is_file() else None
    if not root.is_dir():
        return None
    runs = []
    for d in root.iterdir():
        meta = read_run(d, missing_ok=True)
        if meta and meta.get("name") == settings.name and meta.get("status") != "complete":
            runs.append(d)
    return max(runs, key=lambda d: d.name) if runs else None


def read_run(run_dir: Path, *, missing_ok: bool = False) -> dict[str, Any] | None:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        if missing_ok:
            return None
        raise FtError(f"{run_dir}: not an ft run directory (no {RUN_FILE})")
    return json.loads(path.read_text(encoding="utf-8"))


def update_run(run_dir: Path, **fields: Any) -> dict[str, Any]:
    meta = read_run(run_dir) or {}
    meta.update(fields)
    write_json(Path(run_dir) / RUN_FILE, meta)
    return meta


def create_run(prep: Prepared) -> Path:
    """Make the run directory atomically with its recipe, environment and data manifests."""
    s = prep.settings
    root = Path(s.output.dir)
    name = run_name(s, hashlib.sha256((s.sha256 + prep.data_sha256).encode()).hexdigest())
    env = capture()
    env["run"] = {
        "recipe_sha256": s.sha256,
        "data_sha256": prep.data_sha256,
        "data": [
            {"name": f["name"], "sha256": f["sha256"], "rows": f.get("rows")}
            for f in prep.check.report["files"]
        ],
        "seed": s.train.seed,
        "started": utc_now(),
    }
    with atomic_dir(root / name) as staging:
        write_text(staging / "recipe.resolved.yaml", s.to_yaml())
        write_json(staging / "env.json", env)
        write_json(
            staging / "data.json", {**prep.check.report, "data_sha256": prep.data_sha256, "env": "env.json"}
        )
        write_json(
            staging / RUN_FILE,
            {
                "format": "ft-run/1",
                "name": name,
                "recipe": s.name,
                "status": "created",
                "recipe_sha256": s.sha256,
                "data_sha256": prep.data_sha256,
                "created": utc_now(),
            },
        )
    return root / name


def env_ref(run_dir: Path) -> dict[str, str]:
    return {"path": "env.json", "sha256": sha256_file(Path(run_dir) / "env.json")}


def choose_device_and_backend(settings) -> tuple[str, str, str]:
    from ft import backends
    from ft.modelref import is_builtin

    device = settings.resolved_device()
    model_type = "qwen2" if is_builtin(settings.model.name_or_path) else _model_type(settings)
    name, reason = backends.choose(settings, device, model_type)
    return device, name, reason


def _model_type(settings) -> str | None:
    from ft.modelref import resolve_model_path

    path = Path(resolve_model_path(settings.model.name_or_path))
    config = path / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("model_type")
    if settings.resolved_device() != "cuda":
        return None  # no need to reach the Hub just to choose between backends on CPU
    from ft.modelref import load_config

    return getattr(load_config(settings.model.name_or_path, settings.model.revision), "model_type", None)


def initial_micro_batch(settings, device: str, backend: tuple[str, str] | None = None) -> tuple[int, str]:
    """(micro-batch to start from, why): the recipe's, or for `auto` the largest `ft size` predicts fits."""
    mb = settings.train.micro_batch
    if mb != "auto":
        return int(mb), "recipe (train.micro_batch)"
    if device != "cuda":
        # No memory model for host RAM; a modest batch that divides the effective batch keeps CPU runs responsive.
        micro = max(d for d in range(1, 9) if settings.train.effective_batch % d == 0)
        return micro, "auto on CPU: the largest divisor of train.effective_batch up to 8"
    from ft.sizing import size_report

    report = size_report(settings, backend=backend)
    gpu = report.gpu.name if report.gpu else "the GPU"
    if report.max_micro_batch:
        return report.max_micro_batch, f"auto: the largest micro-batch `ft size` predicts fits on {gpu}"
    return 1, f"auto: `ft size` predicts that not even micro-batch 1 fits on {gpu}; trying 1"


def train_stage(prep: Prepared, run_dir: Path, *, resume: str | None, force: bool = False):
    from ft import train as training
    from ft.data.encode import encode
    from ft.sizing.autobatch import OutOfMemory, step_down

    s = prep.settings
    device, backend, reason = choose_device_and_backend(s)
    rows_train = encode(
        prep.check.train,
        prep.tokenizer,
        s.train.max_seq_length,
        s.data.too_long,
        assistant_only=s.train.assistant_only_loss,
    )
    rows_eval = encode(
        prep.check.eval, prep.tokenizer, s.train.max_seq_length, "truncate", assistant_only=True
    )
    if not rows_train:
        raise FtError(
            "data: no training rows left after encoding; check train.max_seq_length and data.too_long"
        )
    start, source = initial_micro_batch(s, device, (backend, reason))
    retry: bool | str = s.train.micro_batch == "auto"
    resumed = training.find_resume_point(run_dir, resume)
    first_step = 0
    if resumed is not None:  # the checkpoint pins the micro-batch (ft.train keeps the run's data order)
        marker = training.read_marker(resumed)
        start, first_step = int(marker.get("micro_batch", start)), int(marker.get("step", 0))
        source, retry = f"checkpoint {resumed.name}", f"resuming {resumed.name} keeps its micro-batch"
    update_run(run_dir, status="training", backend=backend, backend_reason=reason, device=device)

    # Optimizer steps completed by this attempt (ft.train counts every step of the process): an OOM before
    # the first one is a start-up OOM (step down), after it a mid-run OOM (stop, keep the checkpoint).
    def steps_done() -> int:
        return int(getattr(training, "_steps_done_in_process", 0))

    before = [steps_done()]

    def attempt(micro: int, _accum: int):
        before[0] = steps_done()
        return training.train(
            s,
            run_dir,
            rows_train,
            rows_eval,
            data_sha256=prep.data_sha256,
            device=device,
            backend=backend,
            backend_reason=reason,
            micro_batch=micro,
            resume=resume,
            force=force,
        )

    def last_checkpoint() -> str | None:
        done = training.list_checkpoints(run_dir)
        return f"checkpoints/{done[-1].name}" if done else None

    try:
        result, micro, attempts = step_down(
            attempt,
            start,
            s.train.effective_batch,
            started=lambda: steps_done() > before[0],
            current_step=lambda: first_step + steps_done() - before[0] + 1,
            checkpoint=last_checkpoint,
            log=lambda line: print(line, file=sys.stderr, flush=True),
            retry=retry,
        )
    except OutOfMemory as exc:
        update_run(run_dir, status="failed", error=str(exc), micro_batch_attempts=exc.attempts)
        raise
    result.micro_batch_attempts = attempts
    choice = {
        "setting": s.train.micro_batch,
        "start": start,
        "source": source,
        "micro_batch": result.micro_batch,
        "grad_accum": result.grad_accum,
        "effective_batch": s.train.effective_batch,
        "attempts": attempts,
    }
    env = json.loads((run_dir / "env.json").read_text())
    env["run"].update(
        ended=utc_now(),
        backend=backend,
        backend_reason=reason,
        micro_batch=result.micro_batch,
        grad_accum=result.grad_accum,
        micro_batch_choice=choice,
    )
    write_json(run_dir / "env.json", env)
    write_json(
        result.adapter_dir / "ft-adapter.json",
        {
            "base_model": s.model.name_or_path,
            "recipe_sha256": s.sha256,
            "env": "../env.json",
            "env_sha256": env_ref(run_dir)["sha256"],
            "backend": backend,
        },
    )
    update_run(
        run_dir,
        status="trained",
        train=result.to_dict(),
        micro_batch_choice=choice,
        env_sha256=env_ref(run_dir)["sha256"],
    )
    return result


def eval_stage(prep: Prepared, run_dir: Path) -> dict[str, Any]:
    from ft.eval.evaluate import evaluate
    from ft.report.eval_report import write_eval_outputs

    s = prep.settings
    meta = read_run(run_dir)
    device = meta.get("device") or s.resolved_device()
    backend = meta.get("backend") or choose_device_and_backend(s)[1]
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise FtError(f"{run_dir}: no trained adapter yet; run `ft train` first")
    outcome = evaluate(s, adapter, prep.check.eval, device=device, backend=backend)
    ref = env_ref(run_dir)
    write_eval_outputs(run_dir, outcome.report, outcome.predictions, s, ref)
    update_run(run_dir, status="complete", verdict=outcome.report["decision"]["verdict"], completed=utc_now())
    return outcome.report


def package_stage(settings, run_dir: Path, *, include_data: bool | None = None, sign_key: str | None = None):
    from ft.bundle import package

    return package(
        run_dir,
        Path(settings.output.bundle_dir),
        include_data=settings.export.include_data if include_data is None else include_data,
        sign_key=Path(sign_key or settings.export.sign_key)
        if (sign_key or settings.export.sign_key)
        else None,
        archive=settings.export.archive,
    )


def settings_of_run(run_dir: Path):
    """The exact recipe a run was made with (its recipe.resolved.yaml), ignoring FT_* env."""
    import yaml

    from ft.config import settings_from_dict

    path = Path(run_dir) / "recipe.resolved.yaml"
    if not path.is_file():
        raise FtError(f"{run_dir}: not an ft run directory (no recipe.resolved.yaml)")
    return settings_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), str(path))
