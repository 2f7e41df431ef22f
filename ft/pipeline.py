"""The loop, one stage per function: check -> train -> eval -> package.

The CLI calls these; each stage reads what the previous one left in the run directory, so `ft train`,
`ft eval` and `ft package` can also be run one at a time (and `ft run` is just all of them).

A run directory is created only after the recipe and the data have passed their checks, and removed
again when training fails before its first step, so bad input never leaves a half-made run behind.
Progress lines (`say`) go to stdout; stderr keeps the one-line errors.
"""

from __future__ import annotations

import hashlib
import json
import os
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
    # A template chosen by data.chat_template renders the rows the model learns: a file edited in place
    # under the same path is other training data. (The tokenizer's own is pinned by the model revision;
    # leaving it out keeps the digests of runs made before the setting existed.)
    template = ((report.get("tokenizer") or {}).get("chat_template")) or {}
    if template.get("source") in ("named", "file"):
        key["chat_template"] = template.get("sha256")
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def check_data(settings, tokenizer=None, *, on_problem=None) -> Prepared:
    """The data check; the tokenizer (a download, for a Hub model) is loaded only once the rows pass."""
    from ft import data

    result = data.check(settings, tokenizer=tokenizer, on_problem=on_problem)
    return Prepared(settings, result, result.tokenizer, data_sha256(result.report))


def run_name(settings, digest: str) -> str:
    if settings.output.run_name:
        return settings.output.run_name
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{settings.name}-{stamp}-{digest[:8]}"


# Statuses after which a command has nothing left to do on a run without --resume.
FINISHED_TRAINING = ("trained", "complete")  # `ft train`
FINISHED_RUN = ("complete",)  # `ft run` (a trained run still needs its evaluation)

# Output directories this process created for a run, removed again if that run is discarded.
_made_output_dirs: set[Path] = set()


def say(line: str) -> None:
    """A progress line on the console: stdout, beside the results, so stderr keeps one line per error.
    Under several processes only rank 0 speaks (the others would repeat it)."""
    from ft.secrets import redact
    from ft.train.distributed import is_main

    if is_main():
        print(redact(line), flush=True)


def training_sha256(settings) -> str:
    """sha256 of the settings that decide the trained weights: the recipe without the sections a resume
    may change (output, export, eval, description). Equal values and equal data = the same training."""
    from ft.train import RESUME_SAFE_KEYS

    kept = {k: v for k, v in settings.to_dict().items() if k not in RESUME_SAFE_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def find_resumable_run(settings, data_sha256: str, *, finished=FINISHED_TRAINING) -> Path | None:
    """For `--resume auto`: output.run_name's run if set, else the newest unfinished run under output.dir
    trained from the same settings and data, matched by the hashes recorded in its run.json."""
    root = Path(settings.output.dir)
    if settings.output.run_name:
        candidate = root / settings.output.run_name
        return candidate if (candidate / RUN_FILE).is_file() else None
    if not root.is_dir():
        return None
    key = training_sha256(settings)
    matches = []
    for d in root.iterdir():
        if d.name.startswith(".") or not d.is_dir():
            continue
        try:
            meta = read_run(d, missing_ok=True)
        except ValueError:  # a run.json torn by hand; not a run to continue
            continue
        if not isinstance(meta, dict) or meta.get("status") in finished:
            continue
        # Runs made before training_sha256 was recorded match on the whole recipe.
        same = (
            meta.get("training_sha256") == key
            if "training_sha256" in meta
            else meta.get("recipe_sha256") == settings.sha256
        )
        if same and meta.get("data_sha256") == data_sha256:
            matches.append((str(meta.get("created", "")), d.name, d))
    return max(matches)[2] if matches else None


def open_run(
    prep: Prepared, *, run_dir: str | None = None, resume: str | None = None, finished=FINISHED_TRAINING
) -> tuple[Path, bool]:
    """The run directory a train/run command works in, and whether it was just created.

    `--run-dir PATH`: that run, or a new run made there when PATH does not exist (or is an empty folder).
    `--resume auto`: the run found by `find_resumable_run`, else a new one. Without --resume a run that
    already trained (or holds checkpoints) is refused rather than silently trained again from scratch.
    """
    s = prep.settings
    resuming = resume not in (None, "", "no", "never")
    found: Path | None = None
    if run_dir:
        path = Path(run_dir)
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            return create_run(prep, at=path), True
        if not (path / RUN_FILE).is_file():
            raise FtError(
                f"--run-dir {path}: exists and is not an ft run directory (no {RUN_FILE})",
                hint="give a run directory, a new path or an empty folder",
            )
        found = path
    elif resuming:
        found = _run_of_checkpoint(resume) or find_resumable_run(s, prep.data_sha256, finished=finished)
        if found is None:
            say(f"no unfinished run of this recipe and data under {s.output.dir}/; starting a new run")
    elif s.output.run_name and (Path(s.output.dir) / s.output.run_name / RUN_FILE).is_file():
        found = Path(s.output.dir) / s.output.run_name
    if found is None:
        return create_run(prep), True
    if not resuming:
        _refuse_to_restart(found, finished)
    return found, False


def _run_of_checkpoint(resume: str | None) -> Path | None:
    """`--resume RUN/checkpoints/step-N` continues RUN itself."""
    if resume in (None, "auto"):
        return None
    run = Path(resume).parent.parent
    return run if (run / RUN_FILE).is_file() else None


def _refuse_to_restart(run_dir: Path, finished) -> None:
    from ft.train import list_checkpoints

    meta = read_run(run_dir) or {}
    status = meta.get("status")
    done = list_checkpoints(run_dir)
    if status in finished:
        raise FtError(
            f"{run_dir}: this run has already finished (status {status}); not training it again from scratch",
            hint="for a new run choose another output.run_name or --run-dir; to go on with this one "
            "(evaluate, package) add --resume auto",
        )
    if done or status not in (None, "created"):
        last = f", last checkpoint {done[-1].name}" if done else ""
        raise FtError(
            f"{run_dir}: this run was started before (status {status}{last}); not overwriting it",
            hint="continue it with --resume auto, or choose another output.run_name or --run-dir",
        )


def discard_run(run_dir: Path) -> None:
    """Remove a run this process created and never trained: rename it hidden first, then delete it."""
    import contextlib
    import shutil

    run_dir = Path(run_dir)
    doomed = run_dir.with_name(f".{run_dir.name}.partial")
    shutil.rmtree(doomed, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.replace(run_dir, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
    parent = run_dir.parent
    if parent in _made_output_dirs:
        with contextlib.suppress(OSError):
            parent.rmdir()  # only when empty
            _made_output_dirs.discard(parent)


def summarize_data(report: dict[str, Any]) -> str:
    """Two console lines from the data manifest: rows, split and drops; token lengths."""
    rows, files = report.get("rows", {}), report.get("files", [])
    split = report.get("split", {})
    how = "seeded split" if split.get("method") == "seeded" else "eval files"
    names = ", ".join(str(f.get("name", "?")) for f in files[:3])
    names += " ..." if len(files) > 3 else ""
    dropped = {
        reason: tally.get("count", 0)
        for reason, tally in report.get("dropped", {}).items()
        if isinstance(tally, dict) and tally.get("count")
    }
    drops = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in dropped.items()) or "none"
    t, too_long = report.get("tokens", {}), report.get("too_long", {})
    return (
        f"data: {rows.get('read', '?')} rows from {names}: {rows.get('train', '?')} train + "
        f"{rows.get('eval', '?')} eval ({how}); dropped: {drops}\n"
        f"data: tokens per row p50 {t.get('p50', '?')}, p99 {t.get('p99', '?')}, max {t.get('max', '?')} "
        f"(train.max_seq_length {too_long.get('max_seq_length', '?')}); `ft data check` shows the full report"
    )


def prepare_run(settings, *, run_dir: str | None, resume: str | None, finished=FINISHED_TRAINING):
    """check -> the run directory, with progress on the console: (Prepared, run directory, created now)."""
    from ft.train import distributed

    m = settings.model
    distributed.check(settings, settings.resolved_device())
    distributed.init(settings.resolved_device())  # the launcher's process group, if any (else nothing)
    say(f"check: reading the data and the tokenizer of {m.name_or_path}")
    prep = check_data(settings)
    say(summarize_data(prep.check.report))
    if not distributed.launched():
        path, new = open_run(prep, run_dir=run_dir, resume=resume, finished=finished)
        return prep, path, new
    # Every rank checked the data; all must have seen the same, then rank 0 alone opens (or makes) the
    # run directory and tells the others which it is (the name carries a time stamp only rank 0 took).
    distributed.agree("the data (sha256)", prep.data_sha256)
    distributed.agree("the resolved recipe (sha256)", settings.sha256)
    opened = distributed.run_on_main(open_run, prep, run_dir=run_dir, resume=resume, finished=finished)
    path, new = Path(opened[0]), bool(opened[1]) and distributed.is_main()
    return prep, path, new


def rank_done() -> bool:
    """After training: True on the ranks other than 0, whose part of the command ends there (rank 0
    alone evaluates, writes reports and packages, with nothing left for the others to wait on)."""
    from ft.train import distributed

    return not distributed.is_main()


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


def create_run(prep: Prepared, at: Path | None = None) -> Path:
    """Make the run directory atomically with its recipe, environment and data manifests.

    `at`: the run's path (--run-dir); default output.dir / the run name."""
    s = prep.settings
    if at is not None:
        root, name = Path(at).parent, Path(at).name
        if Path(at).is_dir():
            Path(at).rmdir()  # an empty folder given as --run-dir becomes the run
    else:
        root = Path(s.output.dir)
        name = run_name(s, hashlib.sha256((s.sha256 + prep.data_sha256).encode()).hexdigest())
    if not root.exists():
        _made_output_dirs.add(root)
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
                "training_sha256": training_sha256(s),
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
        from ft.train.distributed import world_size

        per_rank = max(1, settings.train.effective_batch // world_size())  # effective_batch spans the ranks
        micro = max(d for d in range(1, 9) if per_rank % d == 0)
        return micro, "auto on CPU: the largest divisor of train.effective_batch up to 8"
    from ft.sizing import size_report

    report = size_report(settings, backend=backend)
    gpu = report.gpu.name if report.gpu else "the GPU"
    if report.max_micro_batch:
        return report.max_micro_batch, f"auto: the largest micro-batch `ft size` predicts fits on {gpu}"
    return 1, f"auto: `ft size` predicts that not even micro-batch 1 fits on {gpu}; trying 1"


def train_stage(
    prep: Prepared, run_dir: Path, *, resume: str | None, force: bool = False, new_run: bool = False
):
    """Train into run_dir. `new_run`: this command created run_dir, so a failure before the first
    optimizer step removes it again (bad settings leave no run behind); an existing run gets its status
    back. A stop signal after a step leaves the run "interrupted" at its new checkpoint."""
    from ft import train as training
    from ft.sizing.autobatch import OutOfMemory
    from ft.train.signals import Interrupted

    steps_before = training._steps_done_in_process
    status_before = (read_run(run_dir, missing_ok=True) or {}).get("status")
    try:
        return _train_stage(prep, Path(run_dir), resume=resume, force=force, resuming_run=not new_run)
    except BaseException as exc:
        stepped = training._steps_done_in_process > steps_before  # an optimizer step in this attempt
        done = training.list_checkpoints(run_dir)
        if not training.distributed.is_main():
            raise
        if new_run and not stepped and not done:
            discard_run(run_dir)
        elif stepped and isinstance(exc, Interrupted):
            update_run(run_dir, status="interrupted", checkpoint=done[-1].name if done else None)
        elif not stepped and not isinstance(exc, OutOfMemory):  # OutOfMemory records "failed" itself
            update_run(run_dir, status=status_before)
        raise


def _train_stage(prep: Prepared, run_dir: Path, *, resume: str | None, force: bool, resuming_run: bool):
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
    world = training.distributed.world_size()
    training.distributed.check(s, device)
    if s.train.effective_batch % world or (
        s.train.micro_batch != "auto" and s.train.effective_batch % (s.train.micro_batch * world)
    ):
        raise FtError(
            f"train.effective_batch ({s.train.effective_batch}) must be a multiple of train.micro_batch x "
            f"processes ({s.train.micro_batch} x {world}): every rank takes the same share of a step"
        )
    effective = s.train.effective_batch // world  # per rank
    start, source = initial_micro_batch(s, device, (backend, reason))
    retry: bool | str = s.train.micro_batch == "auto"
    if retry and world > 1:  # one rank stepping down alone would leave the others waiting on it
        retry = f"{world} processes must start with one micro-batch; set train.micro_batch to change it"
    resumed = training.find_resume_point(run_dir, resume)
    first_step = 0
    if resumed is not None:  # the checkpoint pins the micro-batch (ft.train keeps the run's data order)
        marker = training.read_marker(resumed)
        start, first_step = int(marker.get("micro_batch", start)), int(marker.get("step", 0))
        source, retry = f"checkpoint {resumed.name}", f"resuming {resumed.name} keeps its micro-batch"
    if training.distributed.is_main():
        update_run(run_dir, status="training", backend=backend, backend_reason=reason, device=device)
    say(
        ("" if world == 1 else f"{world} processes ({training.distributed.mode(s)}): ")
        + f"train: {len(rows_train)} rows on {device}, backend {backend} [{reason}], micro-batch {start} "
        f"[{source}]; loading {s.model.name_or_path}"
    )

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
            resuming_run=resuming_run and resume not in (None, "", "no", "never"),
        )

    def last_checkpoint() -> str | None:
        done = training.list_checkpoints(run_dir)
        return f"checkpoints/{done[-1].name}" if done else None

    try:
        result, micro, attempts = step_down(
            attempt,
            start,
            effective,
            started=lambda: steps_done() > before[0],
            current_step=lambda: first_step + steps_done() - before[0] + 1,
            checkpoint=last_checkpoint,
            log=lambda line: print(line, file=sys.stderr, flush=True),
            retry=retry,
        )
    except OutOfMemory as exc:
        if training.distributed.is_main():
            update_run(run_dir, status="failed", error=str(exc), micro_batch_attempts=exc.attempts)
        raise
    result.micro_batch_attempts = attempts
    topology = training.distributed.topology()  # every node's host facts (collective; None for one process)
    if not training.distributed.is_main():
        return result
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
        weights=result.info.get("weights"),  # the repo, revision and Hub commit the backend loaded
    )
    if topology is not None:
        env["distributed"] = {**topology, **result.info.get("distributed", {})}
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
    n = min(len(prep.check.eval), s.eval.max_examples or len(prep.check.eval))
    say(f"eval: base and tuned model on {n} held-out rows ({device}, backend {backend})")
    outcome = evaluate(s, adapter, prep.check.eval, device=device, backend=backend)
    ref = env_ref(run_dir)
    write_eval_outputs(run_dir, outcome.report, outcome.predictions, s, ref)
    update_run(run_dir, status="complete", verdict=outcome.report["decision"]["verdict"], completed=utc_now())
    if s.train.report_to:
        from ft.report.trackers import log_final

        log_final(s, run_dir, outcome.report, step=int((meta.get("train") or {}).get("steps") or 0))
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
