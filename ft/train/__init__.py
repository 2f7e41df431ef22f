"""The training loop: TRL's SFTTrainer on pre-tokenised rows, with what ft adds on top.

Rows arrive as input_ids + labels masked to assistant tokens (`ft.data.encode`), packed or not
(`ft.train.packing`). Around TRL's loop:

- checkpoints are atomic and a resume is checked against the recipe and data (`ft.train.checkpoints`);
- per-step metrics (loss, learning rate, grad norm, tokens/s, padding) go to `metrics.jsonl` and a
  progress bar, from rank 0 only under torchrun (`ft.train.distributed`);
- the first SIGINT/SIGTERM finishes the current step, checkpoints it and stops (`ft.train.signals`);
- the adapter gets a real model card naming the recipe's model id (`ft.train.card`);
- test-only fault points let tests kill or pause a run at a named step (`ft.train.faults`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ft.fsutil import disk_error, remove_stale_partials, write_json
from ft.train import distributed, packing, signals
from ft.train.checkpoints import (  # the first three are this package's API (pipeline, tests)
    CHECKPOINT_MARKER as CHECKPOINT_MARKER,
)
from ft.train.checkpoints import (
    CHECKPOINT_PREFIX as CHECKPOINT_PREFIX,
)
from ft.train.checkpoints import (
    RESUME_SAFE_KEYS as RESUME_SAFE_KEYS,
)
from ft.train.checkpoints import (
    _atomic_checkpoint_trainer,
    _eval_logged_at,
    check_resume_compatible,
    find_resume_point,
    list_checkpoints,
    prune_checkpoints,
    read_marker,
    rewind_metrics,
)
from ft.train.faults import _test_kill_armed, _test_kill_point, _test_pause_point


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
