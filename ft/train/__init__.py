"""Trainer assembly, atomic checkpoints and resume.

TRL's SFTTrainer drives the loop on pre-tokenised rows (input_ids + labels masked to assistant tokens,
built by `ft.data.encode`). What ft adds on top:

- checkpoints are staged in a hidden sibling, fsynced, stamped with a marker (`ft-checkpoint.json`,
  written last) and renamed into `checkpoints/step-NNNNNN`; only marked checkpoints are ever resumed;
- a resume compares the checkpoint's recipe and data hashes with the current ones and refuses a silent
  mismatch, naming what changed;
- per-step metrics (loss, learning rate, grad norm, tokens/s) go to `metrics.jsonl` and a progress bar;
  a resume first drops the rows logged after its checkpoint, so the curve has each step once.

- the first SIGINT/SIGTERM finishes the current step, checkpoints it and stops (ft.train.signals);
- the adapter gets a real model card naming the recipe's model id (ft.train.card).

Test-only fault hook: `FT_TEST_KILL_AT="<where>:<step>:<phase>"` makes the process SIGKILL itself at
one named point (see `_test_kill_point` and its callers), so tests/test_resume.py can prove that a run
killed anywhere resumes to the same adapter. Unset, it costs one environment lookup per point.
`FT_TEST_PAUSE_AT` (same form) with `FT_TEST_PAUSE_FILE` makes it touch that file at the point and wait
there for a stop signal, so a test can send a real SIGINT/SIGTERM at a known step.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ft.errors import FtError
from ft.fsutil import (
    disk_error,
    fsync_dir,
    fsync_tree,
    is_disk_full,
    remove_stale_partials,
    write_json,
    write_text,
)
from ft.train import distributed, packing, signals

CHECKPOINT_MARKER = "ft-checkpoint.json"
CHECKPOINT_PREFIX = "step-"
# Settings that may differ between a checkpoint and its resume without changing the maths.
RESUME_SAFE_KEYS = {"output", "export", "eval", "description"}


@dataclass
class TrainResult:
    adapter_dir: Path
    backend: str
    backend_reason: str
    device: str
    micro_batch: int
    grad_accum: int
    steps: int
    train_loss: float | None
    runtime_s: float
    tokens_seen: int
    resumed_from: str | None
    micro_batch_attempts: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["adapter_dir"] = str(self.adapter_dir)
        return d


# Optimizer steps completed in this process: tells an out-of-memory at start-up (retry with a smaller
# micro-batch) from one in the middle of a run (stop, keep the last checkpoint).
_steps_done_in_process = 0


def started() -> bool:
    return _steps_done_in_process > 0


def _test_kill_armed(where: str, step: int, phase: str) -> bool:
    """Test-only: is FT_TEST_KILL_AT set to this point? (Never set outside tests/test_resume.py and
    tests/test_distributed.py; FT_TEST_KILL_RANK, when set, arms it on that rank only.)"""
    if os.environ.get("FT_TEST_KILL_AT") != f"{where}:{step}:{phase}":
        return False
    only = os.environ.get("FT_TEST_KILL_RANK")
    return only is None or only == os.environ.get("RANK", "0")


def _test_kill_point(where: str, step: int, phase: str) -> None:
    """Test-only: die here, as `kill -9` would (no cleanup, no flush), when FT_TEST_KILL_AT names this point."""
    if _test_kill_armed(where, step, phase):
        os.kill(os.getpid(), signal.SIGKILL)


def _test_pause_point(where: str, step: int, phase: str) -> None:
    """Test-only: touch FT_TEST_PAUSE_FILE and wait (up to 5 minutes) for a stop signal at this point."""
    if os.environ.get("FT_TEST_PAUSE_AT") != f"{where}:{step}:{phase}":
        return
    Path(os.environ["FT_TEST_PAUSE_FILE"]).touch()
    deadline = time.monotonic() + 300
    while not signals.requested() and time.monotonic() < deadline:
        time.sleep(0.02)


# -- checkpoints --------------------------------------------------------------------------------------
def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (marker present), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [
        p
        for p in root.iterdir()
        if p.name.startswith(CHECKPOINT_PREFIX) and (p / CHECKPOINT_MARKER).is_file()
    ]
    return sorted(done, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def read_marker(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / CHECKPOINT_MARKER).read_text())


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        if not prefix and k in RESUME_SAFE_KEYS:
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def check_resume_compatible(
    marker: dict[str, Any], recipe: dict[str, Any], data_sha256: str, *, force: bool, world_size: int = 1
) -> list[str]:
    """Refuse to resume a checkpoint made from another recipe or other data, unless forced.

    Returns what changed (empty unless forced), so a forced resume is recorded with the run.
    """
    problems = []
    changed = _differences(marker.get("recipe", {}), recipe)
    if changed:
        problems.append(
            "recipe changed (" + "; ".join(changed[:3]) + (" ..." if len(changed) > 3 else "") + ")"
        )
    if marker.get("data_sha256") != data_sha256:
        problems.append(f"data changed (sha256 {str(marker.get('data_sha256'))[:12]} -> {data_sha256[:12]})")
    if int(marker.get("world_size", 1)) != world_size:  # each rank's share of a step, and the data order
        problems.append(f"processes changed ({marker.get('world_size', 1)} -> {world_size})")
    if problems and not force:
        raise FtError(
            f"cannot resume from {marker.get('checkpoint', 'checkpoint')}: " + " and ".join(problems),
            hint="start a new run, or pass --force to resume anyway",
        )
    if problems:
        from ft.secrets import redact

        print(redact(f"warning: resuming despite: {' and '.join(problems)} (--force)"), file=sys.stderr)
    return problems


def find_resume_point(run_dir: Path, resume: str | None) -> Path | None:
    """`--resume auto` -> last complete checkpoint (or None to start fresh); a path -> that checkpoint."""
    if resume in (None, "", "no", "never"):
        return None
    if resume == "auto":
        checkpoints = list_checkpoints(run_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not (path / CHECKPOINT_MARKER).is_file():
        raise FtError(f"--resume {resume}: not a complete ft checkpoint (no {CHECKPOINT_MARKER})")
    return path


def _discard(checkpoint: Path) -> Path:
    """Rename a checkpoint to a hidden `.partial` first, so a kill mid-delete never leaves a marked husk."""
    doomed = checkpoint.with_name(f".{checkpoint.name}.partial")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(checkpoint, doomed)
    return doomed


def prune_checkpoints(run_dir: Path, keep_last: int, step: int = 0) -> None:
    for old in list_checkpoints(run_dir)[:-keep_last]:
        doomed = _discard(old)
        _test_kill_point("checkpoint", step, "mid-prune")
        shutil.rmtree(doomed, ignore_errors=True)


def rewind_metrics(run_dir: Path, step: int) -> None:
    """Keep the metrics rows up to `step` (where training restarts) and drop a line torn by a kill."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # the last line, cut short by a kill or a full disk
        if isinstance(row, dict) and int(row.get("step", 0)) <= step:
            kept.append(line + "\n")
    write_text(path, "".join(kept))


# -- trainer assembly ---------------------------------------------------------------------------------
def _callbacks(run_dir: Path, total_steps_hint: int | None):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    metrics_path = run_dir / "metrics.jsonl"

    class MetricsAndProgress(TrainerCallback):
        """metrics.jsonl (appended, flushed per line so a kill loses at most one line) and a progress bar."""

        def __init__(self):
            self.bar = None
            self.t_last = None
            self.tokens_last = 0

        def on_train_begin(self, args, state, control, **kw):
            if not state.is_world_process_zero:  # one bar and one metrics file per run, rank 0's
                return
            # In a log file (CI, `docker compose run -T`) redraw rarely instead of on every step.
            interval = 0.2 if sys.stderr.isatty() else 15.0
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                mininterval=interval,
            )
            self.t_last, self.tokens_last = time.perf_counter(), state.num_input_tokens_seen

        def on_pre_optimizer_step(self, args, state, control, **kw):
            _test_kill_point("step", state.global_step + 1, "mid")  # gradients computed, weights not updated

        def on_step_end(self, args, state, control, **kw):
            _test_kill_point("step", state.global_step, "end")  # before this step is logged or saved
            _test_pause_point("step", state.global_step, "end")
            global _steps_done_in_process
            _steps_done_in_process += 1
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero:  # the logged loss is already averaged over the ranks
                return
            logs = dict(logs or {})
            now = time.perf_counter()
            row: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
            if "loss" in logs:
                dt = max(now - (self.t_last or now), 1e-9)
                tokens = state.num_input_tokens_seen - self.tokens_last
                row.update(
                    kind="train",
                    loss=logs["loss"],
                    learning_rate=logs.get("learning_rate"),
                    grad_norm=logs.get("grad_norm"),
                    tokens_per_s=round(tokens / dt, 1),
                    tokens_seen=state.num_input_tokens_seen,
                )
                # real tokens (no padding) per optimizer step and padding's share (ft.train.packing)
                row.update({k: logs[k] for k in ("tokens_per_step", "padding_share") if k in logs})
                import torch

                if torch.cuda.is_available():  # report.html: memory over time, measured vs `ft size` peak
                    row.update(
                        gpu_memory_bytes=torch.cuda.memory_allocated(),
                        gpu_peak_bytes=torch.cuda.max_memory_allocated(),
                    )
                self.t_last, self.tokens_last = now, state.num_input_tokens_seen
                if self.bar is not None:
                    self.bar.set_postfix(
                        loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}", refresh=False
                    )
            elif "eval_loss" in logs:
                row.update(kind="eval", eval_loss=logs["eval_loss"])
            else:
                return
            line = json.dumps(row) + "\n"
            try:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    if _test_kill_armed("metrics", state.global_step, "torn-line"):
                        f.write(line[: len(line) // 2])
                        f.flush()
                        _test_kill_point("metrics", state.global_step, "torn-line")
                    f.write(line)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:
                raise disk_error(metrics_path, exc) from exc

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    class StopWhenAlreadyDone(TrainerCallback):
        """A resume from the run's last checkpoint (killed after training, e.g. while saving the adapter)
        has nothing left to train; transformers would run one step past max_steps when that falls mid-epoch."""

        def on_train_begin(self, args, state, control, **kw):
            if 0 < state.max_steps <= state.global_step:
                raise _AlreadyTrained

    return [StopWhenAlreadyDone(), MetricsAndProgress()]


class _AlreadyTrained(Exception):
    """Raised by StopWhenAlreadyDone after the checkpoint's weights are loaded: they are the adapter."""


def _eval_logged_at(run_dir: Path, step: int) -> bool:
    path = run_dir / "metrics.jsonl"
    rows = (
        [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []
    )
    return any(row.get("kind") == "eval" and row.get("step") == step for row in rows)


def _atomic_checkpoint_trainer(base_cls, run_dir: Path, marker_extra: dict[str, Any], keep_last: int):
    """Subclass the backend's trainer so every checkpoint is staged, fsynced, marked and renamed."""

    class AtomicCheckpointTrainer(base_cls):
        def _load_optimizer_and_scheduler(self, checkpoint):
            # Several CPU processes: Accelerate names each one's device `cpu:<n>` and transformers passes
            # it to torch.load as map_location, which torch cannot map to ("don't know how to restore data
            # location ... cpu:0"). The tensors belong on the CPU anyway: load them with plain `cpu`.
            device = self.args.device
            if checkpoint is None or device.type != "cpu" or device.index is None:
                return super()._load_optimizer_and_scheduler(checkpoint)
            import torch

            self.args.__dict__["_setup_devices"] = torch.device("cpu")
            try:
                return super()._load_optimizer_and_scheduler(checkpoint)
            finally:
                self.args.__dict__["_setup_devices"] = device

        def _save_optimizer_and_scheduler(self, output_dir):
            # The weights are in the staging directory by now; optimizer, scheduler and RNG are not.
            _test_kill_point("checkpoint", self.state.global_step, "between-files")
            super()._save_optimizer_and_scheduler(output_dir)

        def _save_checkpoint(self, model, trial):
            root = run_dir / "checkpoints"
            step = self.state.global_step
            final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
            staging_parent = root / f".staging-{step:06d}.partial"
            if distributed.is_main():
                shutil.rmtree(staging_parent, ignore_errors=True)
            distributed.barrier()  # the staging directory is empty before any rank writes its part
            try:
                self._stage_checkpoint(model, trial, staging_parent, final, step)
            except Exception as exc:
                # torch.save and safetensors do not raise OSError on a full disk; look before cleaning up.
                full = not isinstance(exc, FtError) and is_disk_full(exc, root)
                shutil.rmtree(staging_parent, ignore_errors=True)
                if not (full or isinstance(exc, OSError)):
                    raise
                last = list_checkpoints(run_dir)
                what = "no space left on device" if full else f"could not write ({exc.strerror or exc})"
                raise FtError(
                    f"{final}: {what} while writing the checkpoint; the last complete checkpoint "
                    f"({last[-1].name if last else 'none'}) is intact",
                    hint="free some space, then continue with `ft train --resume auto`",
                ) from exc
            _test_kill_point("checkpoint", step, "before-prune")
            if distributed.is_main():
                prune_checkpoints(run_dir, keep_last, step)

        def _stage_checkpoint(self, model, trial, staging_parent: Path, final: Path, step: int) -> None:
            original = self.args.output_dir
            self.args.output_dir = str(staging_parent)
            try:
                # Writes staging_parent/checkpoint-<step>; under several processes rank 0 writes the weights,
                # optimizer and trainer state and every rank its own rng_state_<rank>.pth.
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = original
            written = staging_parent / f"checkpoint-{step}"
            # Every rank's part is on disk before rank 0 marks the checkpoint, and no rank goes on (or
            # could resume) before it is final; a rank that died never reaches the barrier, so no marker.
            distributed.barrier()
            if distributed.is_main():
                self._finish_checkpoint(written, final, step)
            distributed.barrier()

        def _finish_checkpoint(self, written: Path, final: Path, step: int) -> None:
            world = distributed.world_size()
            missing = [
                f"rng_state_{r}.pth" for r in range(world) if not (written / f"rng_state_{r}.pth").is_file()
            ]
            if world > 1 and missing:
                raise FtError(
                    f"{final}: {', '.join(missing)} missing from the checkpoint: the ranks do not share "
                    f"{run_dir}",
                    hint="put output.dir on storage every node sees (a shared volume)",
                )
            marker = {
                **marker_extra,
                "checkpoint": final.name,
                "step": step,
                "epoch": self.state.epoch,
                "micro_batch": self.args.per_device_train_batch_size,
                "grad_accum": self.args.gradient_accumulation_steps,
                "tokens_seen": self.state.num_input_tokens_seen,
                "world_size": world,
                "files": sorted(p.name for p in written.iterdir()),
            }
            fsync_tree(written)
            _test_kill_point("checkpoint", step, "before-marker")
            write_json(written / CHECKPOINT_MARKER, marker)  # the marker is written last
            _test_kill_point("checkpoint", step, "before-rename")
            if final.exists():  # only when re-running from an explicit older checkpoint
                shutil.rmtree(_discard(final))
            os.replace(written, final)
            fsync_dir(final.parent)
            shutil.rmtree(written.parent, ignore_errors=True)

    return AtomicCheckpointTrainer


def _to_dataset(rows: list[dict[str, Any]], fingerprint: str | None = None):
    import pyarrow as pa
    from datasets import Dataset
    from datasets.fingerprint import generate_random_fingerprint
    from datasets.table import InMemoryTable

    # The fingerprint is given, not computed: `datasets` would hash the whole table to make one, which
    # transiently costs about six times the table (0.45 GB for 75,000 chat rows; benchmarks/scale_rss.py).
    fingerprint = fingerprint or generate_random_fingerprint()
    keys = ("input_ids", "labels") + (("seq_lengths",) if rows and "seq_lengths" in rows[0] else ())  # packed
    columns = {key: pa.array([r[key] for r in rows], type=pa.list_(pa.int64())) for key in keys}
    return Dataset(InMemoryTable(pa.table(columns)), fingerprint=fingerprint)


def seed_everything(seed: int, deterministic: bool) -> None:
    from transformers import enable_full_determinism, set_seed

    if deterministic:
        enable_full_determinism(seed)
    else:
        set_seed(seed)


def build_sft_config(
    settings, run_dir: Path, device: str, micro: int, accum: int, dtype: str, has_eval: bool
):
    from trl import SFTConfig

    from ft.report import trackers

    t = settings.train
    return SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=max(1, micro),
        gradient_accumulation_steps=accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        seed=t.seed,
        data_seed=t.seed,
        full_determinism=t.deterministic,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        use_cpu=device == "cpu",
        logging_steps=t.log_every,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_every,
        save_total_limit=None,  # ft prunes its own (marked) checkpoints
        eval_strategy="epoch" if has_eval else "no",
        # Trackers' environment (offline, under run_dir unless the user set theirs) is set up here too.
        report_to=trackers.report_to(settings, run_dir) or "none",
        run_name=run_dir.name,
        disable_tqdm=True,  # ft draws its own bar with loss and learning rate
        include_num_input_tokens_seen="non_padding",
        max_length=t.max_seq_length,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        dataloader_num_workers=0,
        completion_only_loss=False,
        **packing.sft_config_fields(settings),
        **distributed.trainer_args(settings),
    )


def train(
    settings,
    run_dir: Path,
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    *,
    data_sha256: str,
    device: str,
    backend: str,
    backend_reason: str,
    micro_batch: int,
    resume: str | None = None,
    force: bool = False,
    resuming_run: bool = False,
) -> TrainResult:
    """Train a LoRA adapter into `run_dir/adapter`; checkpoints under `run_dir/checkpoints`.

    `resuming_run`: the run existed before this command (found by --resume), so the console says from
    which step it goes on. A SIGINT/SIGTERM raises `signals.Interrupted` after checkpointing the step.
    """
    with signals.StopRequest() as stop:
        return _train(
            settings,
            Path(run_dir),
            train_rows,
            eval_rows,
            stop=stop,
            data_sha256=data_sha256,
            device=device,
            backend=backend,
            backend_reason=backend_reason,
            micro_batch=micro_batch,
            resume=resume,
            force=force,
            resuming_run=resuming_run,
        )


def _train(
    settings,
    run_dir: Path,
    train_rows,
    eval_rows,
    *,
    stop: signals.StopRequest,
    data_sha256: str,
    device: str,
    backend: str,
    backend_reason: str,
    micro_batch: int,
    resume: str | None,
    force: bool,
    resuming_run: bool,
) -> TrainResult:
    from transformers import TrainerCallback

    from ft import backends

    main, world = distributed.is_main(), distributed.world_size()
    if main:  # rank 0 alone changes the run directory; the others look once it is done
        remove_stale_partials(run_dir)  # e.g. an adapter whose write was killed
        remove_stale_partials(run_dir / "checkpoints")
    distributed.barrier()
    recipe = settings.to_dict()
    start_from = find_resume_point(run_dir, resume)
    forced: list[str] = []
    if start_from is not None:
        marker = read_marker(start_from)
        forced = check_resume_compatible(marker, recipe, data_sha256, force=force, world_size=world)
        micro_batch = int(marker.get("micro_batch", micro_batch))  # keep the data order of the original run
    if main:  # rows logged after the checkpoint (or by an attempt that never reached one) come again
        rewind_metrics(run_dir, int(marker.get("step", 0)) if start_from is not None else 0)

    accum = max(1, settings.train.effective_batch // (micro_batch * world))  # effective_batch spans ranks
    impl = backends.get(backend)
    seed_everything(settings.train.seed, settings.train.deterministic)
    loaded = impl.load_for_training(settings, device)
    # Re-seed after loading so the LoRA init and data order do not depend on how loading consumed RNG.
    seed_everything(settings.train.seed, settings.train.deterministic)

    config = build_sft_config(settings, run_dir, device, micro_batch, accum, loaded.dtype, bool(eval_rows))
    trainer_cls = _atomic_checkpoint_trainer(
        packing.counting_trainer(impl.trainer_class()),
        run_dir,
        {"recipe": recipe, "recipe_sha256": settings.sha256, "data_sha256": data_sha256, "backend": backend},
        settings.train.keep_last,
    )
    if settings.train.packing:
        train_rows = packing.pack_rows(train_rows, settings.train.max_seq_length)
        packing.without_kv_cache(loaded.model)
        packing.quiet_checked_warnings()
    trainer = trainer_cls(
        model=loaded.model,
        args=config,
        train_dataset=_to_dataset(train_rows, f"ft-train-{data_sha256[:16]}-{settings.sha256[:16]}"),
        eval_dataset=_to_dataset(eval_rows, f"ft-eval-{data_sha256[:16]}-{settings.sha256[:16]}")
        if eval_rows
        else None,
        processing_class=loaded.tokenizer,
        callbacks=[
            *((_announce_resume(run_dir, TrainerCallback),) if resuming_run else ()),
            *(callbacks := _callbacks(run_dir, None)),
            *((distributed.stop_agreement(stop),) if world > 1 else ()),
            signals.stop_callback(stop),  # last: after the test pause point that waits for the signal
        ],
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if settings.train.packing and backend == "hf":  # Unsloth reads `seq_lengths` into its own kernels
        packing.keep_sequences_apart(trainer)

    t0 = time.perf_counter()
    try:
        output = trainer.train(resume_from_checkpoint=str(start_from) if start_from else None)
        train_loss = _finite(output.training_loss)
    except _AlreadyTrained:
        train_loss = None
        logged = distributed.broadcast(main and _eval_logged_at(run_dir, trainer.state.global_step))
        if eval_rows and not logged:
            trainer.evaluate()  # the end-of-training evaluation the kill cut off, logged as it would have been
    finally:
        stop.stage = "finishing"
        for callback in callbacks:  # end the progress bar's line before any error is printed
            if hasattr(callback, "bar"):
                callback.on_train_end(None, None, None)
    runtime = time.perf_counter() - t0
    if stop.requested:
        raise _interrupted(run_dir, stop.signum, trainer.state)

    if main:
        prune_checkpoints(run_dir, settings.train.keep_last)  # in case a kill came before the last prune
    card = {
        "run": run_dir.name,
        "steps": trainer.state.global_step,
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "micro_batch": micro_batch,
        "grad_accum": accum,
        "backend": backend,
        "dtype": loaded.dtype,
        "quantization": loaded.quantization,
        "data_sha256": data_sha256,
        "data_files": _data_files(run_dir),
    }
    # FSDP holds a shard of every weight on each rank: gather the full state dict (a collective, as
    # transformers' Trainer.save_model does) for rank 0 to write.
    full = trainer.accelerator.get_state_dict(trainer.model_wrapped) if trainer.is_fsdp_enabled else None
    if main:
        adapter_dir = save_adapter(trainer, loaded, run_dir, settings=settings, card=card, state_dict=full)
    else:
        adapter_dir = run_dir / "adapter"
    distributed.barrier()  # the adapter is on disk before any rank reports the run trained
    return TrainResult(
        adapter_dir=adapter_dir,
        backend=backend,
        backend_reason=backend_reason,
        device=device,
        micro_batch=micro_batch,
        grad_accum=accum,
        steps=trainer.state.global_step,
        train_loss=train_loss,
        runtime_s=round(runtime, 2),
        tokens_seen=int(trainer.state.num_input_tokens_seen),
        resumed_from=start_from.name if start_from else None,
        info={
            **loaded.info,
            "dtype": loaded.dtype,
            "quantization": loaded.quantization,
            **({"forced_resume": forced} if forced else {}),
            **({"distributed": distributed.describe(settings, micro_batch, accum)} if world > 1 else {}),
        },
    )


def _announce_resume(run_dir: Path, base):
    class AnnounceResume(base):
        def on_train_begin(self, args, state, control, **kw):
            if not state.is_world_process_zero:
                return
            print(
                f"resuming run {run_dir.name} from step {state.global_step} of {state.max_steps}", flush=True
            )

    return AnnounceResume()


def _interrupted(run_dir: Path, signum: int, state) -> signals.Interrupted:
    done = list_checkpoints(run_dir)
    step = int(read_marker(done[-1]).get("step", 0)) if done else 0
    kept = (
        f"checkpoint {done[-1].name} holds step {step} of {state.max_steps}"
        if done
        else "no checkpoint was written yet"
    )
    return signals.Interrupted(
        f"interrupted by {signals.signal_name(signum)} at step {state.global_step}: {kept}; "
        "run the same command with `--resume auto` to continue",
        signum,
    )


def _data_files(run_dir: Path) -> list[tuple[str, Any]]:
    path = run_dir / "data.json"
    if not path.is_file():
        return []
    files = json.loads(path.read_text(encoding="utf-8")).get("files", [])
    return [(f.get("name", "?"), f.get("rows")) for f in files]


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def save_adapter(
    trainer, loaded, run_dir: Path, *, settings=None, card: dict | None = None, state_dict=None
) -> Path:
    """The adapter in PEFT format (safetensors) plus the tokenizer and a model card, written atomically.
    `state_dict`: the full weights gathered from FSDP shards (None: the model's own)."""
    from ft.fsutil import atomic_dir
    from ft.train import card as model_card

    final = run_dir / "adapter"
    with atomic_dir(final, replace=True) as staging:
        trainer.model.save_pretrained(
            str(staging), safe_serialization=True, **({"state_dict": state_dict} if state_dict else {})
        )
        _test_kill_point("adapter", trainer.state.global_step, "staged")
        loaded.tokenizer.save_pretrained(str(staging))
        if settings is not None:
            model_card.set_base_model(staging, settings)
            model_card.write_card(staging, settings, card or {})
        write_json(staging / "ft-adapter.json", {"env": "../env.json", "recipe": "../recipe.resolved.yaml"})
    return final
