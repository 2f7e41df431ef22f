"""Atomic checkpoints and what a resume may start from.

Checkpoints are staged in a hidden sibling, fsynced, stamped with a marker (`ft-checkpoint.json`,
written last) and renamed into `checkpoints/step-NNNNNN`; only marked checkpoints are ever resumed. A
resume compares the checkpoint's recipe and data hashes with the current ones and refuses a silent
mismatch, naming what changed; it first drops the metrics rows logged after its checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from ft.errors import FtError
from ft.fsutil import (
    fsync_dir,
    fsync_tree,
    is_disk_full,
    write_json,
    write_text,
)
from ft.train import distributed
from ft.train.faults import _test_kill_point

CHECKPOINT_MARKER = "ft-checkpoint.json"
CHECKPOINT_PREFIX = "step-"
# Settings that may differ between a checkpoint and its resume without changing the maths.
RESUME_SAFE_KEYS = {"output", "export", "eval", "description"}


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
