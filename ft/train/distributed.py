"""Several processes, one run: ranks, barriers and gathering for `torchrun` / `accelerate launch`.

ft never launches processes or builds a process group by hand. The launcher sets RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, ... and Accelerate's `PartialState` (the same object transformers'
TrainingArguments builds) opens the process group from them: gloo on CPU, NCCL on CUDA. ft opens it
early, before the run directory exists, so that the ranks can agree on that directory; the Trainer then
finds the group already there and uses it.

The rule the rest of ft follows: rank 0 alone writes run files, metrics, reports, eval outputs and
bundles; every rank writes its own part of a checkpoint (HF's rng_state_{rank}.pth) into the staging
directory before rank 0 marks and renames it. Single-process runs take none of these paths (every helper
answers as rank 0 of 1 without importing torch).
"""

from __future__ import annotations

import os
import platform
from typing import Any

from ft.errors import FtError

# How the Trainer (through Accelerate's dataloader sharding) splits the one seeded order between ranks.
SHARDING = (
    "one seeded order for all ranks; each optimizer step takes the next world_size x micro_batch x "
    "grad_accum rows and rank r reads micro-batches r, r+world_size, ... of it (Accelerate batch sharding)"
)


def _int_env(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def world_size() -> int:
    """Processes in this run, as the launcher set WORLD_SIZE (1 outside a launcher)."""
    return max(1, _int_env("WORLD_SIZE", 1))


def rank() -> int:
    return _int_env("RANK", 0) if world_size() > 1 else 0


def local_rank() -> int:
    return _int_env("LOCAL_RANK", 0) if world_size() > 1 else 0


def is_main() -> bool:
    """True on the process that writes (rank 0), and on every single-process run."""
    return rank() == 0


def launched() -> bool:
    return world_size() > 1


def mode(settings) -> str:
    """`none`, `ddp` or `fsdp` for this process: `none` under a launcher with several processes is DDP
    (each rank a full replica, the usual meaning of `torchrun ... ft run`); one process is never wrapped."""
    wanted = settings.train.distributed
    if not launched():
        return "none"
    return "ddp" if wanted == "none" else wanted


def check(settings, device: str) -> None:
    """Refuse what cannot run as asked: FSDP without CUDA (Accelerate would quietly fall back to DDP
    while the run recorded fsdp)."""
    if mode(settings) == "fsdp" and device != "cuda":
        from ft.config import FSDP_CPU

        raise FtError(
            f"train.distributed: fsdp needs CUDA GPUs, but this run trains on {device} ({FSDP_CPU})"
        )


def init(device: str) -> None:
    """Open the process group from the launcher's environment (no-op for one process)."""
    if not launched():
        return
    import atexit

    from accelerate import PartialState

    PartialState(cpu=device != "cuda")
    atexit.register(finish)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def barrier() -> None:
    dist = _dist() if launched() else None
    if dist is not None:
        dist.barrier()


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank ([obj] for one process)."""
    dist = _dist() if launched() else None
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    dist = _dist() if launched() else None
    if dist is None:
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(what: str, value: Any) -> None:
    """Refuse, on every rank, when the ranks do not see the same `value` (e.g. other data on a node)."""
    values = gather(value)
    if any(v != values[0] for v in values):
        differing = [i for i, v in enumerate(values) if v != values[0]]
        raise FtError(
            f"{what} differs between ranks (rank 0 vs rank {differing[0]}); every node must see the same files",
            hint="mount or sync the same data, recipe and model on every node",
        )


def run_on_main(fn, *args, **kwargs) -> Any:
    """Run `fn` on rank 0 only and hand its result (or its FtError) to every rank."""
    result: tuple[str, Any] = ("ok", None)
    if is_main():
        try:
            result = ("ok", fn(*args, **kwargs))
        except FtError as exc:
            result = ("error", (exc.message, exc.hint))
            if not launched():
                raise
    result = broadcast(result)
    if result[0] == "error":
        message, hint = result[1]
        raise FtError(message, hint=hint)
    return result[1]


def trainer_args(settings) -> dict[str, Any]:
    """TrainingArguments fields for this process's mode; {} for one process (the single-GPU path as is).

    DDP: every LoRA weight takes part in every forward, so DDP need not search the graph for unused
    parameters (transformers would, for a PeftModel). FSDP (FSDP2, transformers' default): each decoder
    layer (the model's `_no_split_modules`) is sharded on its own, and a full state dict is gathered for
    saving so the adapter is written as one file."""
    m = mode(settings)
    if m == "none":
        return {}
    args: dict[str, Any] = {"ddp_find_unused_parameters": False}
    if m == "fsdp":
        args.update(
            fsdp="full_shard auto_wrap",
            fsdp_config={
                "version": 2,
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "state_dict_type": "FULL_STATE_DICT",
                "cpu_ram_efficient_loading": False,
            },
        )
    return args


def describe(settings, micro_batch: int, grad_accum: int) -> dict[str, Any]:
    """What the run records about its processes and how they split the data."""
    return {
        "mode": mode(settings),
        "world_size": world_size(),
        "micro_batch_per_rank": micro_batch,
        "grad_accum": grad_accum,
        "effective_batch": micro_batch * grad_accum * world_size(),
        "data_order": SHARDING,
    }


def stop_agreement(stop):
    """A TrainerCallback that, after each step, gives every rank the stop request any rank received, so
    all ranks checkpoint and stop at the same step (a rank that stopped alone would hang the others)."""
    from transformers import TrainerCallback

    class AgreeOnStop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            signums = [s for s in gather(stop.signum) if s is not None]
            if signums and stop.signum is None:
                stop.signum = signums[0]

    return AgreeOnStop()


def host_facts() -> dict[str, Any]:
    """This process's node: hostname, CPU, GPUs, driver and CUDA (what a multi-node manifest lists)."""
    from ft.manifest import _cpu_name, gpu_facts

    gpu = gpu_facts(with_torch=True)
    return {
        "hostname": platform.node(),
        "cpu": {"name": _cpu_name(), "count": os.cpu_count()},
        "gpus": [d["name"] for d in gpu["devices"]],
        "driver": gpu["driver"],
        "cuda": gpu["cuda_runtime"],
        "local_world_size": _int_env("LOCAL_WORLD_SIZE", 1),
    }


def topology() -> dict[str, Any] | None:
    """World size, processes per node, node count and each node's host facts, gathered over the process
    group (collective: every rank calls it). None for one process."""
    if not launched():
        return None
    facts = gather({"rank": rank(), "local_rank": local_rank(), **host_facts()})
    nodes: dict[str, dict[str, Any]] = {}
    for f in facts:
        node = nodes.setdefault(
            f["hostname"], {k: v for k, v in f.items() if k not in ("rank", "local_rank")}
        )
        node.setdefault("ranks", []).append(f["rank"])
    return {
        "world_size": world_size(),
        "nproc_per_node": _int_env("LOCAL_WORLD_SIZE", 1),
        "nnodes": len(nodes),
        "nodes": list(nodes.values()),
    }


def finish() -> None:
    """Leave the process group cleanly at the end of a command (after a last barrier)."""
    dist = _dist() if launched() else None
    if dist is not None:
        dist.destroy_process_group()
