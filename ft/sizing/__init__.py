"""`ft size`: predict a QLoRA run's peak GPU memory from first principles, against a GPU; measure it (probe).

The prediction is arithmetic on the model's config.json (read as plain JSON for a local directory, or
a built-in shape such as `qwen2.5-7b`): no torch, no transformers, well under a second. Every term is
derived from what the libraries allocate, and every constant below says where it comes from. One
memory constant is calibrated rather than derived (UNSLOTH_CE_LIVE_BYTES_PER_LOGIT), and the wall-time
utilisation is measured; both against issue 8's H100 figures, which tests/test_sizing.py keeps as a table
(every point within 10% except hf 0.5B at 4 x 512, not reconciled). `benchmarks/bench_gpu.py` puts
measured peaks beside these predictions.

What the two backends hold (derived from their code, see the comments at each term):

- `hf` (transformers + peft + bitsandbytes): linear layers in NF4; `peft.prepare_model_for_kbit_training`
  then casts *every* remaining 16-bit parameter (embeddings, LM head, norms, biases) to fp32, so the
  residual stream is fp32 and each quantised linear makes its own 16-bit copy of its input (bitsandbytes
  `Linear4bit` casts to the compute dtype, autocast casts again for the LoRA path). Standard (non-reentrant)
  gradient checkpointing keeps every layer's input on the GPU; the recomputed layer's backward frees its
  saved tensors op by op. TRL's SFTTrainer casts the LoRA weights to bf16; its chunked loss is the loss.
- `unsloth`: NF4 linears, everything else stays 16-bit, fused LoRA kernels (only X, gate and up saved
  for the MLP), and "unsloth" checkpointing offloads layer inputs to pinned host memory through two GPU
  staging buffers, keeping the last layer's input on the GPU. LoRA weights stay fp32; the loss is
  Unsloth's own fused cross-entropy (it replaces TRL's).

Peak = what persists (weights, LoRA weights + gradients + optimizer states, buffers) + the largest of
three transient phases: the loss (at the start of backward), the backward of the last decoder layer
(recomputed under checkpointing), and the optimizer step. `eval_phases` sizes `ft eval` the same way
(KV cache for the prompt + eval.max_new_tokens, the last position's logits, the chunked held-out loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ft.errors import FtError
from ft.sizing.gpus import GIB, Gpu
from ft.sizing.memory import (  # noqa: F401 - re-exported: ft.sizing is the public face
    ALLOCATOR_RESERVE_FRACTION,
    BNB_8BIT_MIN_SIZE,
    BNB_8BIT_OPTIM_BLOCKSIZE,
    BNB_BLOCKSIZE,
    BNB_NESTED_BLOCKSIZE,
    BNB_NESTED_STATE_BYTES,
    BNB_NF4_CODE_BYTES,
    CUBLAS_WORKSPACE_BYTES,
    CUDA_CONTEXT_BYTES,
    FIT_SAFETY_FRACTION,
    LOSS_BYTES_PER_LOGIT,
    LOSSES,
    MATMUL_PEAK_FRACTION,
    MEASURED_FLOP_UTILISATION,
    OPTIMIZERS,
    PROJECTIONS,
    TRL_CHUNK_TOKENS,
    UNSLOTH_CE_LIVE_BYTES_PER_LOGIT,
    UNSLOTH_CE_TARGET_CAP,
    UNSLOTH_GC_GPU_BUFFERS,
    UNSLOTH_GC_MIN_ELEMENTS,
    UNSLOTH_SDPA_EXPANDS_GQA,
    UTILISATION_SOURCE,
    SizeEstimate,
    _dtype_bytes,
    _hf_layer,
    _lora_tensors,
    _nf4_bytes,
    _optimizer_bytes,
    _unsloth_ce_chunk_bytes,
    _unsloth_layer,
    estimate,
    eval_batch_that_fits,
    eval_persistent_bytes,
    eval_phases,
    eval_transient_bytes,
    fits,
)
from ft.sizing.shapes import (  # noqa: F401 - re-exported: ft.sizing is the public face
    _QKV_BIAS_ALWAYS,
    _TIED_DEFAULT,
    PRESETS,
    Shape,
    _hub_cached_config,
    _llama,
    _preset_for,
    _qwen2,
    load_shape,
    preset_table,
    render_presets,
    shape_from_config,
)
from ft.sizing.throughput import (  # noqa: F401 - re-exported: ft.sizing is the public face
    _count_rows,
    _duration,
    _eta,
    _stat,
    flops_per_token,
    mfu,
    model_flops_per_token,
    stated_data,
)


# -- the report against a GPU and a recipe --------------------------------------------------------------
def _settings_inputs(settings, gpu: Gpu | None) -> dict[str, Any]:
    """Estimate keyword arguments from a recipe (dtype `auto` resolved the way the backends resolve it)."""
    m, lo, t = settings.model, settings.lora, settings.train
    dtype = m.dtype
    if dtype == "auto":
        dtype = "bfloat16" if gpu is None or gpu.bf16 else "float16"
    return {
        "lora_r": lo.r,
        "target_modules": tuple(lo.target_modules),
        "quantization": "nf4" if m.quantization == "auto" else m.quantization,
        "dtype": dtype,
        "gradient_checkpointing": t.gradient_checkpointing,
        "optimizer": t.optimizer,
        "lora_dropout": lo.dropout,
    }


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


@dataclass
class SizeReport:
    model: str
    backend: str
    backend_reason: str
    estimate: SizeEstimate
    gpu: Gpu | None
    fits: bool | None
    headroom_bytes: int | None
    max_micro_batch: int | None  # largest divisor of train.effective_batch that fits (None: unknown/none)
    grad_accum: int | None
    effective_batch: int
    eta: dict[str, Any]
    probe: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None
    ranks: Any = None  # ft.sizing.ranks.RanksReport when sized for several processes (--nproc)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "backend": self.backend,
            "backend_reason": self.backend_reason,
            "gpu": self.gpu.to_dict() if self.gpu else None,
            "fits": self.fits,
            "headroom_bytes": self.headroom_bytes,
            "micro_batch": self.estimate.inputs["micro_batch"],
            "max_micro_batch": self.max_micro_batch,
            "grad_accum": self.grad_accum,
            "effective_batch": self.effective_batch,
            "estimate": self.estimate.to_dict(),
            "eta": self.eta,
            "probe": self.probe,
            "eval": self.eval,
            "ranks": self.ranks.to_dict() if self.ranks else None,
        }

    def render(self) -> str:
        e, i = self.estimate, self.estimate.inputs
        out = [
            f"model {self.model} ({e.params['total'] / 1e9:.2f} B params, LoRA {e.params['lora'] / 1e6:.1f} M), "
            f"backend {self.backend} ({self.backend_reason})",
            f"micro-batch {i['micro_batch']} x {i['seq_len']} tokens, {i['quantization']}, {i['dtype']}, "
            f"checkpointing {i['gradient_checkpointing']}, {i['optimizer']}, loss {i['loss']}",
            "",
            e.render(),
            "",
        ]
        if self.gpu is None:
            out.append("GPU: none given or present: prediction only (pass --gpu 24GiB or --gpu rtx4090)")
        else:
            g = self.gpu
            verdict = "FITS" if self.fits else "DOES NOT FIT"
            out.append(
                f"GPU {g.name}: {g.memory_bytes / GIB:.1f} GiB -> {verdict}, headroom "
                f"{self.headroom_bytes / GIB:+.2f} GiB"
            )
            if self.max_micro_batch:
                out.append(
                    f"largest micro-batch that fits (divisor of effective batch {self.effective_batch}): "
                    f"{self.max_micro_batch}, gradient accumulation {self.grad_accum}"
                )
            else:
                out.append(
                    "not even micro-batch 1 fits: lower train.max_seq_length, keep quantization nf4 and "
                    "gradient checkpointing on, or use a smaller model / larger GPU"
                )
        ev = self.eval
        if ev:
            fit = (
                f"largest that fits: {ev['batch_that_fits']}"
                if ev.get("batch_that_fits") is not None
                else "no GPU to fit against"
            )
            out.append(
                f"eval: batch {ev['batch_size']} x ({ev['prompt_tokens']} prompt + {ev['new_tokens']} new tokens) "
                f"-> predicted peak {ev['peak_allocated_bytes'] / GIB:.2f} GiB ({ev['phase']}; {fit}; "
                "ft eval lowers the batch to what fits and halves it on an out-of-memory)"
            )
        eta = self.eta
        if eta.get("seconds"):
            out.append(
                f"time: {eta['tokens']:.3g} tokens ({eta['tokens_source']}) over {eta['steps']} steps "
                f"at {eta['tokens_per_s']:.0f} tokens/s ~ {_duration(eta['seconds'])}"
            )
            if eta["tokens_per_s_source"] != "measured by --probe":
                out.append(
                    f"  the ETA assumes {eta['tokens_per_s_source']}; `ft size --probe` measures this GPU"
                )
            else:
                out.append("  the ETA uses the tokens/s measured by --probe")
        elif eta.get("why"):
            out.append(f"time: not estimated ({eta['why']})")
        if eta.get("packing"):  # train.packing: memory above is already each sequence at max_seq_length
            pk = eta["packing"]
            out.append(
                f"packing: {pk['sequences']:,.0f} sequences an epoch of up to {self.estimate.inputs['seq_len']} "
                f"tokens, {pk['tokens_per_sequence']:.0f} real tokens each ({pk['source']})"
            )
        if self.probe:
            p = self.probe
            err = (e.peak_allocated_bytes - p["peak_allocated_bytes"]) / p["peak_allocated_bytes"]
            out.append(
                f"probe ({p['steps']} steps at micro-batch {p['micro_batch']} x {p['seq_len']}): measured peak "
                f"{p['peak_allocated_bytes'] / GIB:.2f} GiB vs predicted {e.peak_allocated_bytes / GIB:.2f} GiB "
                f"({err:+.1%}), {p['tokens_per_s']:.0f} tokens/s"
            )
        if self.ranks:
            out += ["", self.ranks.render()]
        return "\n".join(out)


def resolve_backend(settings, shape: Shape, gpu: Gpu | None = None) -> tuple[str, str]:
    """The backend training on a CUDA GPU would use (ft.backends.choose's rule), importing nothing heavy.

    A requested backend is sized as requested even where it is not installed: the question is what the
    run needs on the GPU it will run on."""
    import importlib.util

    from ft.backends import UNSLOTH_ARCHITECTURES

    wanted = settings.train.backend
    if wanted != "auto":
        return wanted, f"requested (train.backend: {wanted})"
    if importlib.util.find_spec("unsloth") is None:
        return "hf", "auto: unsloth is not installed here"
    if shape.model_type not in UNSLOTH_ARCHITECTURES:
        return "hf", f"auto: Unsloth does not support {shape.model_type!r}"
    return "unsloth", f"auto: a supported architecture ({shape.model_type})"


def size_report(
    settings,
    *,
    gpu: str | Gpu | None = None,
    micro_batch: int | None = None,
    data_stats: dict | None = None,
    probe_result: dict | None = None,
    backend: tuple[str, str] | None = None,
    nproc: int | None = None,
    nodes: int = 1,
    distributed: str | None = None,
    interconnect: str | None = None,
) -> SizeReport:
    """Predict the recipe's peak memory against a GPU (named, an amount, or the one present).

    backend: (name, reason) of the backend training will use, when the caller already chose it; else
    it is resolved the way `backend: auto` would resolve on a CUDA machine (`resolve_backend`).
    nproc (processes per node), nodes, distributed (ddp | fsdp; default train.distributed, `none` = ddp),
    interconnect: also predict each rank's memory and the wall time on nproc x nodes GPUs (ft.sizing.ranks).
    """
    from ft.sizing import gpus

    if micro_batch is not None and micro_batch < 1:
        raise FtError(f"--micro-batch {micro_batch}: must be at least 1")
    device = gpus.resolve(gpu) if not isinstance(gpu, Gpu) else gpu
    m, t = settings.model, settings.train
    shape = load_shape(m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    backend, reason = backend or resolve_backend(settings, shape, device)
    world = (nproc or 1) * nodes
    if world > 1 and backend == "unsloth":  # Unsloth is the single-GPU path (ft.backends.choose's rule)
        if settings.train.backend == "unsloth":
            raise FtError(f"train.backend: unsloth runs on one GPU; for {world} processes use hf or auto")
        backend, reason = "hf", f"auto: {world} processes (Unsloth is the single-GPU path)"
    kw = _settings_inputs(settings, device)
    kw.update(
        backend=backend, seq_len=t.max_seq_length, gpu_memory_bytes=device.memory_bytes if device else None
    )

    max_micro = accum = None
    if device is not None:
        for d in _divisors_desc(t.effective_batch):
            if fits(estimate(shape, micro_batch=d, **kw), device):
                max_micro, accum = d, t.effective_batch // d
                break
    micro = micro_batch or (t.micro_batch if t.micro_batch != "auto" else None) or max_micro or 1
    est = estimate(shape, micro_batch=micro, **kw)
    ok = headroom = None
    if device is not None:
        ok, headroom = fits(est, device, 0.0), device.memory_bytes - est.total_bytes
    tps = probe_result.get("tokens_per_s") if probe_result else None
    eta = _eta(settings, shape, est, device, data_stats, tps)
    eval_info = _eval_report(settings, shape, est, device)
    ranks = None
    if nproc is not None:
        from ft.sizing.ranks import ranks_report

        ranks = ranks_report(
            settings,
            shape,
            kw,
            est,
            eta,
            device,
            nproc=nproc,
            nodes=nodes,
            distributed=distributed,
            interconnect=interconnect,
            micro_batch=micro_batch,
        )
    name = m.name_or_path if shape.name in ("model", m.name_or_path) else f"{m.name_or_path} [{shape.name}]"
    return SizeReport(
        name,
        backend,
        reason,
        est,
        device,
        ok,
        headroom,
        max_micro,
        accum,
        t.effective_batch,
        eta,
        probe_result,
        eval_info,
        ranks,
    )


def _eval_report(settings, shape: Shape, est: SizeEstimate, gpu: Gpu | None) -> dict[str, Any]:
    """Eval's predicted peak at eval.batch_size, prompts up to train.max_seq_length (an upper bound), and
    the largest batch that fits the GPU beside the loaded weights."""
    e, i = settings.eval, est.inputs
    kw = {
        "prompt_tokens": settings.train.max_seq_length,
        "new_tokens": e.max_new_tokens,
        "loss_tokens": settings.train.max_seq_length,
        "dtype": i["dtype"],
        "quantization": i["quantization"],
    }
    persistent = eval_persistent_bytes(est)
    phases = {k: sum(v.values()) for k, v in eval_phases(shape, e.batch_size, **kw).items()}
    phase = max(phases, key=phases.get)
    fit = None
    if gpu is not None:
        free = gpu.memory_bytes - CUDA_CONTEXT_BYTES - int(persistent * (1 + ALLOCATOR_RESERVE_FRACTION))
        fit = eval_batch_that_fits(shape, max(free, 0), e.batch_size, **kw)
    return {
        "batch_size": e.batch_size,
        "prompt_tokens": kw["prompt_tokens"],
        "new_tokens": e.max_new_tokens,
        "persistent_bytes": persistent,
        "phases": phases,
        "phase": phase,
        "peak_allocated_bytes": persistent + phases[phase],
        "batch_that_fits": fit,
    }


# -- measure it ----------------------------------------------------------------------------------------
def probe(settings, steps: int = 3, *, micro_batch: int | None = None) -> dict[str, Any]:
    """Run `steps` real optimizer steps (after one warm-up step) at max_seq_length through the backend
    and TRL's trainer; return the measured peak allocated memory and tokens/s. CUDA only.

    micro_batch: the one the prediction was made for (`ft size` passes its own), else the recipe's (1 for
    `auto`). Call `ft.backends.prepare(settings)` before anything imports transformers when the backend
    may be Unsloth (`ft size --probe` does); this function does it too, which is enough when nothing
    heavy was imported yet."""
    from ft.manifest import cuda_available

    if not cuda_available():
        raise FtError("ft size --probe needs a CUDA GPU; without one, ft size only predicts")
    if steps < 1:
        raise FtError("--probe steps must be at least 1")
    from ft import backends

    _, name, reason = backends.prepare(settings, device="cuda")
    impl = backends.get(name)
    shape = load_shape(
        settings.model.name_or_path,
        revision=settings.model.revision,
        trust_remote_code=settings.model.trust_remote_code,
    )
    import dataclasses
    import random
    import tempfile
    import time

    import torch
    from transformers import TrainerCallback

    from ft.train import _to_dataset, build_sft_config

    t = settings.train
    micro = micro_batch or (t.micro_batch if t.micro_batch != "auto" else 1)
    seq = t.max_seq_length
    loaded = impl.load_for_training(settings, "cuda")
    rng = random.Random(t.seed)
    vocab = min(shape.vocab, len(loaded.tokenizer))
    rows = []
    for _ in range(micro * (steps + 1)):
        ids = [rng.randrange(vocab) for _ in range(seq)]
        rows.append({"input_ids": ids, "labels": list(ids)})  # every token trained: the loss's worst case

    clock: dict[str, float] = {}

    class Measure(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:  # after the warm-up step: optimizer states exist, kernels are compiled
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                clock["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == steps + 1:
                torch.cuda.synchronize()
                clock["t1"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_sft_config(settings, Path(tmp), "cuda", micro, 1, loaded.dtype, False)
        cfg = dataclasses.replace(
            cfg,
            max_steps=steps + 1,
            save_strategy="no",
            logging_strategy="no",
            report_to="none",  # a probe, not a run: nothing for train.report_to's trackers
            **getattr(impl, "sft_config_overrides", lambda _: {})(settings),
        )
        trainer = impl.trainer_class()(
            model=loaded.model,
            args=cfg,
            train_dataset=_to_dataset(rows),
            processing_class=loaded.tokenizer,
            callbacks=[Measure()],
        )
        if t.packing and name == "hf":  # measured in the layout `ft train` packs in (ft.train.packing)
            from ft.train.packing import keep_sequences_apart

            keep_sequences_apart(trainer)
        trainer.train()
    inner = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
    fwd = inner.__dict__.get("forward")
    free, total = torch.cuda.mem_get_info()
    seconds = clock["t1"] - clock["t0"]
    return {
        "backend": name,
        "backend_reason": reason,
        "steps": steps,
        "micro_batch": micro,
        "seq_len": seq,
        "peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
        "peak_reserved_bytes": int(torch.cuda.max_memory_reserved()),
        "device_used_bytes": int(total - free),
        "tokens_per_s": micro * seq * steps / seconds,
        "loss_path": "chunked_nll"
        if fwd is not None and "chunk" in getattr(fwd, "__name__", "")
        else "model forward",
        "device": torch.cuda.get_device_name(0),
        "info": loaded.info,
    }
