"""`ft size --nproc N`: peak memory per GPU and wall time when one recipe runs as N data-parallel ranks.

Memory per rank, from the single-GPU model's terms (ft.sizing.memory.estimate) at the rank's micro-batch:

- DDP (torch DistributedDataParallel) replicates everything: each rank holds the whole base, the LoRA
  weights, their gradients and optimizer states, and its own activations. On top, DDP copies gradients
  into its all-reduce buckets (gradient_as_bucket_view=False, the default transformers keeps): one more
  copy of the LoRA gradients. More GPUs never lower DDP's per-GPU memory; they only save time.
- FSDP (full sharding) splits every parameter tensor's storage across the ranks: the base weights (the
  packed 4-bit codes in the quant-storage dtype FSDP-QLoRA requires, the embeddings, LM head, norms), the
  LoRA weights, their gradients (reduce-scattered) and the optimizer states are 1/N per rank. What it
  does not shard: the NF4 quantisation constants (bitsandbytes keeps them in each weight's quant_state,
  not a parameter FSDP can flatten), the activations (each rank runs its own micro-batch), the batch, the
  cuBLAS workspace. What it adds, transiently: the layer being computed is all-gathered to full size, and
  with FSDP's default backward prefetch the next one too (FSDP_GATHERED_LAYERS); each layer's LoRA
  gradients exist unsharded until they are reduce-scattered; the root unit (embeddings and LM head, which
  sit outside the decoder layers that the transformer wrap policy wraps) is gathered for the whole step.
  The gathered copies are added to the phase that sets the peak (for the optimizer-step phase that is an
  upper bound).
- Every rank with N > 1 also holds NCCL's communication buffers, outside torch's allocator
  (NCCL_BUFFER_BYTES).

Wall time: the effective batch counts all ranks (train.effective_batch), so the steps and tokens are the
same as on one GPU and N ranks share them. Tokens/s with N GPUs = N x one GPU's tokens/s x an efficiency
that depends on the wrapper and the interconnect (SCALING_EFFICIENCY). Those are assumptions, not
measurements: LoRA's DDP all-reduces only the LoRA gradients (tens of MB per step, overlapped with the
backward), so DDP loses little; FSDP all-gathers the whole base every forward and again in the backward,
which the interconnect has to keep up with. `benchmarks/` measures the real factor where a multi-GPU
machine is available; until then the report says that it assumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ft.errors import FtError
from ft.sizing.gpus import GIB, Gpu
from ft.sizing.memory import ALLOCATOR_RESERVE_FRACTION, CUDA_CONTEXT_BYTES, SizeEstimate, estimate, fits
from ft.sizing.shapes import Shape
from ft.sizing.throughput import _duration

DISTRIBUTED = ("ddp", "fsdp")
INTERCONNECTS = ("nvlink", "pcie", "network")
# Assumed data-parallel efficiency (tokens/s of N GPUs over N x one GPU's), per wrapper and interconnect:
# nvlink = GPUs of one box over NVLink/NVSwitch, pcie = GPUs of one box over PCIe only, network = ranks on
# several machines (inter-node bandwidth sets the pace). Not measured here: replace with measured figures.
SCALING_EFFICIENCY = {
    ("ddp", "nvlink"): 0.95,
    ("ddp", "pcie"): 0.90,
    ("ddp", "network"): 0.85,
    ("fsdp", "nvlink"): 0.85,
    ("fsdp", "pcie"): 0.65,
    ("fsdp", "network"): 0.55,
}
# NCCL's default NCCL_BUFFSIZE is 4 MiB per channel and peer, for the LL, LL128 and Simple protocols;
# with the channels NCCL opens on an 8-GPU NVLink box that is a few hundred MiB per rank, outside torch's
# allocator. A round upper figure, not measured here.
NCCL_BUFFER_BYTES = 512 << 20
FSDP_GATHERED_LAYERS = 2  # the layer being computed + the one BACKWARD_PRE prefetch gathers ahead
_SHARDED = (
    "base linear weights",
    "embeddings",
    "lm head",
    "norms + biases",
    "lora weights",
    "lora gradients",
)
_OPTIMIZER = "optimizer states"


def _sharded(term: str) -> bool:
    return term.startswith(_SHARDED) or term == _OPTIMIZER


def _lora_term(b: dict[str, int], prefix: str) -> int:
    return sum(v for k, v in b.items() if k.startswith(prefix))


@dataclass
class RankEstimate:
    """One rank's predicted peak for `world` ranks under `distributed`."""

    distributed: str
    world: int
    breakdown: dict[str, int]  # per rank; sums to total_bytes
    peak_allocated_bytes: int
    total_bytes: int
    notes: list[str] = field(default_factory=list)


def rank_estimate(est: SizeEstimate, shape: Shape, world: int, distributed: str) -> RankEstimate:
    """The single-GPU estimate `est` (at the rank's micro-batch) turned into one rank's memory."""
    if distributed not in DISTRIBUTED:
        raise FtError(f"--distributed {distributed!r}: expected one of {', '.join(DISTRIBUTED)}")
    if world < 1:
        raise FtError(f"{world} processes: must be at least 1")
    src = est.breakdown
    outside = ("CUDA context (outside allocator)", "allocator reserve (fragmentation)")
    b = {k: v for k, v in src.items() if k not in outside}
    paged = est.inputs["optimizer"] == "paged_adamw_8bit"  # paged states are not in torch's allocated count
    peak = est.peak_allocated_bytes
    notes: list[str] = []
    if world > 1 and distributed == "fsdp":
        for k, v in list(b.items()):
            if _sharded(k) and v:
                b[k] = math.ceil(v / world)
                if not (paged and k == _OPTIMIZER):
                    peak -= v - b[k]
        b = {(f"{k} (1/{world})" if _sharded(k) and v else k): v for k, v in b.items()}
        layer_base = sum(v for k, v in src.items() if k.startswith(("base linear weights", "norms + biases")))
        layer = (layer_base + _lora_term(src, "lora weights")) // shape.layers
        gathered = {
            f"FSDP: {FSDP_GATHERED_LAYERS} decoder layers all-gathered (transient)": FSDP_GATHERED_LAYERS
            * layer,
            "FSDP: one layer's LoRA gradients before reduce-scatter": _lora_term(src, "lora gradients")
            // shape.layers,
            "FSDP: root unit all-gathered (embeddings, LM head)": src.get("embeddings", 0)
            + src.get("lm head", 0),
        }
        b.update(gathered)
        peak += sum(gathered.values())
        notes.append(
            "FSDP shards base weights, LoRA weights, gradients and optimizer states; the NF4 constants, "
            "activations and batch stay per rank; one layer's full weights (and the prefetched next) are "
            "all-gathered at a time"
        )
        if est.inputs["quantization"] == "nf4":
            notes.append(
                "FSDP-QLoRA: bnb_4bit_quant_storage must equal the compute dtype so FSDP can flatten the "
                "4-bit weights with the rest"
            )
    elif world > 1:
        buckets = _lora_term(src, "lora gradients")
        b["DDP gradient buckets (a copy of the LoRA gradients)"] = buckets
        peak += buckets
        notes.append("DDP replicates the model on every rank: per-GPU memory does not fall with more GPUs")
    if world > 1:
        b["NCCL buffers (outside allocator)"] = NCCL_BUFFER_BYTES
    b["CUDA context (outside allocator)"] = CUDA_CONTEXT_BYTES
    b["allocator reserve (fragmentation)"] = int(peak * ALLOCATOR_RESERVE_FRACTION)
    b = {k: int(v) for k, v in b.items()}
    return RankEstimate(distributed, world, b, int(peak), sum(b.values()), notes)


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


@dataclass
class RanksReport:
    """`ft size --nproc N`: the per-rank prediction beside the single-GPU one."""

    distributed: str
    nproc: int
    nodes: int
    interconnect: str
    efficiency: float
    micro_batch: int
    max_micro_batch: int | None
    grad_accum: int
    rank: RankEstimate
    single_total_bytes: int  # one GPU, the whole effective batch: the baseline
    gpu: Gpu | None
    one_gpu_fits: bool | None
    fits: bool | None
    headroom_bytes: int | None
    eta: dict[str, Any]

    @property
    def world(self) -> int:
        return self.nproc * self.nodes

    def verdict(self) -> str:
        if self.gpu is None:
            return "no GPU to fit against (pass --gpu h100): per-rank prediction only"
        if self.one_gpu_fits:
            return f"one GPU fits this: {self.world} GPUs only save time"
        if self.fits:
            return f"one GPU does not fit this; {self.world} GPUs with {self.distributed} do"
        if self.distributed == "ddp":
            return (
                "does not fit on one GPU nor per rank: DDP replicates the model, so more GPUs do not help; "
                "try --distributed fsdp"
            )
        return f"does not fit even sharded over {self.world} GPUs: more GPUs, a larger GPU or a shorter max_seq_length"

    def to_dict(self) -> dict[str, Any]:
        r = self.rank
        return {
            "distributed": self.distributed,
            "nproc_per_node": self.nproc,
            "nodes": self.nodes,
            "world_size": self.world,
            "interconnect": self.interconnect,
            "scaling_efficiency": self.efficiency,
            "micro_batch_per_rank": self.micro_batch,
            "max_micro_batch_per_rank": self.max_micro_batch,
            "grad_accum": self.grad_accum,
            "per_rank_breakdown": r.breakdown,
            "per_rank_peak_allocated_bytes": r.peak_allocated_bytes,
            "per_rank_total_bytes": r.total_bytes,
            "single_gpu_total_bytes": self.single_total_bytes,
            "one_gpu_fits": self.one_gpu_fits,
            "fits_per_rank": self.fits,
            "per_rank_headroom_bytes": self.headroom_bytes,
            "verdict": self.verdict(),
            "eta": self.eta,
            "notes": r.notes,
        }

    def render(self) -> str:
        r = self.rank
        rows = [(k, v) for k, v in r.breakdown.items() if v]
        width = max(len(k) for k, _ in rows)
        out = [
            f"per rank: {self.world} processes ({self.nodes} node(s) x {self.nproc}), {self.distributed}, "
            f"micro-batch {self.micro_batch} per rank, gradient accumulation {self.grad_accum} "
            f"({self.micro_batch} x {self.grad_accum} x {self.world} ranks = effective batch)",
            f"{'term (one rank)':<{width}}  {'GiB':>8}",
        ]
        out += [f"{k:<{width}}  {v / GIB:8.3f}" for k, v in rows]
        out.append(f"{'peak allocated (torch)':<{width}}  {r.peak_allocated_bytes / GIB:8.3f}")
        out.append(f"{'total on each card':<{width}}  {r.total_bytes / GIB:8.3f}")
        out += [f"note: {n}" for n in r.notes]
        if self.gpu is not None:
            out.append(
                f"each {self.gpu.name}: {self.gpu.memory_bytes / GIB:.1f} GiB -> "
                f"{'FITS' if self.fits else 'DOES NOT FIT'}, headroom {self.headroom_bytes / GIB:+.2f} GiB "
                f"(one GPU alone: {self.single_total_bytes / GIB:.2f} GiB)"
            )
        out.append(self.verdict())
        e = self.eta
        if e.get("seconds"):
            out.append(
                f"time with {self.world} GPUs: ~ {_duration(e['seconds'])} (one GPU: "
                f"{_duration(e['single_gpu_seconds'])}; {e['speedup']:.1f}x), "
                f"{e['tokens_per_s_per_gpu']:.0f} tokens/s per GPU"
            )
            out.append(f"  assumes {e['assumption']}")
        elif e.get("why"):
            out.append(f"time with {self.world} GPUs: not estimated ({e['why']})")
        return "\n".join(out)


def default_interconnect(nodes: int) -> str:
    return "network" if nodes > 1 else "nvlink"


def ranks_report(
    settings,
    shape: Shape,
    kw: dict[str, Any],
    single: SizeEstimate,
    single_eta: dict[str, Any],
    gpu: Gpu | None,
    *,
    nproc: int,
    nodes: int = 1,
    distributed: str | None = None,
    interconnect: str | None = None,
    micro_batch: int | None = None,
) -> RanksReport:
    """The per-rank report. kw: estimate()'s keyword arguments for this recipe (without micro_batch);
    single / single_eta: the one-GPU estimate and ETA the rest of `ft size` printed."""
    if nproc < 1 or nodes < 1:
        raise FtError(f"--nproc {nproc} --nodes {nodes}: both must be at least 1")
    dist = distributed or settings.train.distributed
    dist = "ddp" if dist in (None, "none") else dist
    if dist not in DISTRIBUTED:
        raise FtError(f"--distributed {dist!r}: expected one of {', '.join(DISTRIBUTED)}")
    link = interconnect or default_interconnect(nodes)
    if link not in INTERCONNECTS:
        raise FtError(f"--interconnect {link!r}: expected one of {', '.join(INTERCONNECTS)}")
    world = nproc * nodes
    eb = settings.train.effective_batch
    if eb % world:
        raise FtError(
            f"train.effective_batch {eb} does not split over {world} ranks: make it a multiple of {world} "
            f"(--set train.effective_batch={world * max(1, eb // world)})"
        )
    per_rank = eb // world

    def at(m: int) -> RankEstimate:
        return rank_estimate(estimate(shape, micro_batch=m, **kw), shape, world, dist)

    max_micro = None
    if gpu is not None:
        for d in _divisors_desc(per_rank):
            if fits(_as_estimate(at(d)), gpu):
                max_micro = d
                break
    recipe_micro = settings.train.micro_batch if settings.train.micro_batch != "auto" else None
    micro = micro_batch or recipe_micro or max_micro or 1
    if per_rank % micro:
        raise FtError(
            f"micro-batch {micro} does not divide the {per_rank} examples each of {world} ranks takes per "
            f"optimizer step (train.effective_batch {eb} / {world})"
        )
    rank = at(micro)
    one_fits = ok = headroom = None
    if gpu is not None:
        one_fits = fits(single, gpu, 0.0)
        ok = rank.total_bytes <= gpu.memory_bytes
        headroom = gpu.memory_bytes - rank.total_bytes
    eff = 1.0 if world == 1 else SCALING_EFFICIENCY[(dist, link)]
    eta: dict[str, Any] = {}
    if single_eta.get("seconds"):
        speedup = world * eff
        eta = {
            "seconds": single_eta["seconds"] / speedup,
            "single_gpu_seconds": single_eta["seconds"],
            "speedup": speedup,
            "tokens_per_s_per_gpu": single_eta["tokens_per_s"] * eff,
            "tokens_per_s": single_eta["tokens_per_s"] * speedup,
            "assumption": (
                f"{world} x one GPU's tokens/s x {eff:.2f} ({dist} over {link}: an assumed data-parallel "
                "efficiency, not measured; the same steps and tokens as one GPU, since "
                "train.effective_batch counts all ranks)"
            ),
        }
    else:
        eta = {"why": single_eta.get("why", "no single-GPU time estimate")}
    return RanksReport(
        dist,
        nproc,
        nodes,
        link,
        eff,
        micro,
        max_micro,
        per_rank // micro,
        rank,
        single.total_bytes,
        gpu,
        one_fits,
        ok,
        headroom,
        eta,
    )


def _as_estimate(r: RankEstimate) -> SizeEstimate:
    """A SizeEstimate shell around a rank's totals, so memory.fits (and its safety share) applies."""
    return SizeEstimate({}, r.breakdown, r.peak_allocated_bytes, r.total_bytes, "", {}, {})
