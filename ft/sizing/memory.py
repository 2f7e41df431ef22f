"""The memory model: peak GPU memory of a QLoRA training step and of `ft eval`, term by term.

See ft/sizing/__init__.py for what each backend holds and why; every constant here names its source."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ft.errors import FtError
from ft.sizing.gpus import GIB, Gpu
from ft.sizing.shapes import Shape, load_shape

# -- constants, each with its source -------------------------------------------------------------------
BNB_BLOCKSIZE = 64  # bitsandbytes 4-bit blocksize (BitsAndBytesConfig default; Unsloth uses the same)
BNB_NESTED_BLOCKSIZE = 256  # double quant: the absmax values are re-quantised to uint8 in blocks of 256
BNB_NF4_CODE_BYTES = 16 * 4  # per quantised tensor: the 16-entry fp32 NF4 code book
BNB_NESTED_STATE_BYTES = 256 * 4 + 4  # per tensor, double quant: 256-entry fp32 dynamic map + fp32 offset
BNB_8BIT_OPTIM_BLOCKSIZE = 256  # bitsandbytes blockwise 8-bit optimizer: one fp32 absmax per 256 values
BNB_8BIT_MIN_SIZE = 4096  # bitsandbytes keeps tensors with fewer elements in 32-bit state (min_8bit_size)
TRL_CHUNK_TOKENS = 256  # trl 1.14.2 SFTTrainer, loss_type "chunked_nll": tokens per lm_head/CE chunk
LOSS_BYTES_PER_LOGIT = 16  # per (token, vocab) entry: fp32 logits, log-softmax, its gradient, a temporary
UNSLOTH_CE_TARGET_CAP = 4 * GIB  # unsloth_zoo fused CE: chunks sized to min(free/2, 4 GiB) at 16 B per logit
# ... but alive per logit of a chunk: its fp32 logits, which the fused kernel turns into their gradient in
# place. Calibrated, not derived here (unsloth_zoo is not installed on CPU): 16 B over-predicted the
# H100 figures of issue 8 by 20-110%; 4 B lands every Unsloth point within 3% (tests/test_sizing.py).
UNSLOTH_CE_LIVE_BYTES_PER_LOGIT = 4
UNSLOTH_GC_MIN_ELEMENTS = 1 << 20  # unsloth_zoo offloads a layer input only above 2 MiB of bf16
UNSLOTH_GC_GPU_BUFFERS = 2  # ... via two GPU staging buffers (double buffering); last layer stays on GPU
UNSLOTH_SDPA_EXPANDS_GQA = True  # Unsloth's SDPA path repeats K and V to all query heads before attention
CUBLAS_WORKSPACE_BYTES = 32 << 20  # cuBLAS + cuBLASLt workspaces, allocated through torch's caching allocator
CUDA_CONTEXT_BYTES = 600 << 20  # CUDA context, loaded kernels, library handles: outside torch's allocator
ALLOCATOR_RESERVE_FRACTION = 0.08  # caching allocator: reserved exceeds allocated (rounding, fragmentation)
FIT_SAFETY_FRACTION = 0.05  # the micro-batch search keeps this share of the card free (prediction tolerance)
# Wall time: FLOP utilisation of each backend for QLoRA, as measured on an H100 SXM (issue 8's figures,
# same library versions, 7B shape at 2 x 2048): tokens/s x 6 x parameters over a measured bf16 matmul
# peak of ~798 TFLOP/s. Other GPUs: the same utilisation of the same share of their datasheet peak. A
# GPU's own figure comes from `ft size --probe`.
MEASURED_FLOP_UTILISATION = {"unsloth": 0.57, "hf": 0.29}
MATMUL_PEAK_FRACTION = 798.0 / 989.4  # measured bf16 matmul peak / H100 SXM datasheet dense bf16 peak
UTILISATION_SOURCE = "H100 SXM, 7B shape at 2 x 2048"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOSSES = ("chunked_nll", "unsloth_fused", "full")
OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit")


# -- the estimate --------------------------------------------------------------------------------------
@dataclass
class SizeEstimate:
    """Predicted peak for one configuration. `breakdown` sums to `total_bytes`."""

    inputs: dict[str, Any]
    breakdown: dict[str, int]
    peak_allocated_bytes: int  # comparable to torch.cuda.max_memory_allocated()
    total_bytes: int  # + CUDA context + allocator reserve: what must fit on the card
    phase: str  # which transient phase sets the peak
    phases: dict[str, int]  # transient bytes of each phase (beside what persists)
    params: dict[str, int]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "breakdown": self.breakdown,
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "total_bytes": self.total_bytes,
            "phase": self.phase,
            "phases": self.phases,
            "params": self.params,
            "notes": self.notes,
        }

    def render(self) -> str:
        rows = [(k, v) for k, v in self.breakdown.items() if v]
        width = max(len(k) for k, _ in rows)
        lines = [f"{'term':<{width}}  {'GiB':>8}"]
        for k, v in rows:
            lines.append(f"{k:<{width}}  {v / GIB:8.3f}")
        lines.append(f"{'peak allocated (torch)':<{width}}  {self.peak_allocated_bytes / GIB:8.3f}")
        lines.append(f"{'total on the card':<{width}}  {self.total_bytes / GIB:8.3f}")
        lines.append(
            f"(peak set by: {self.phase}; other phases: "
            + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in self.phases.items() if k != self.phase)
            + ")"
        )
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _dtype_bytes(dtype: str) -> int:
    return 4 if dtype in ("float32", "fp32") else 2


def _nf4_bytes(n: int, double_quant: bool) -> tuple[int, int]:
    """(packed codes, quantisation constants) for one NF4 tensor of n values, as bitsandbytes stores them."""
    blocks = math.ceil(n / BNB_BLOCKSIZE)
    if double_quant:  # uint8 absmax per block + fp32 absmax per 256 blocks + per-tensor maps
        consts = blocks + 4 * math.ceil(blocks / BNB_NESTED_BLOCKSIZE) + BNB_NESTED_STATE_BYTES
    else:  # fp32 absmax per block
        consts = 4 * blocks
    return math.ceil(n / 2), consts + BNB_NF4_CODE_BYTES


def _lora_tensors(shape: Shape, r: int, targets: tuple[str, ...]) -> list[int]:
    """Element counts of every LoRA matrix (A: r x in, B: out x r) in the model."""
    sizes = []
    for name, (fan_in, fan_out, _) in shape.linears().items():
        if name in targets:
            sizes += [r * fan_in, fan_out * r] * shape.layers
    return sizes


def _optimizer_bytes(sizes: list[int], optimizer: str, param_bytes: int = 4) -> int:
    if optimizer == "adamw_torch":  # exp_avg + exp_avg_sq, zeros_like(param): the parameters' dtype
        return 2 * param_bytes * sum(sizes)
    total = 0
    for n in sizes:  # bitsandbytes 8-bit blockwise: two uint8 states + fp32 absmax per block, each
        if n < BNB_8BIT_MIN_SIZE:
            total += 8 * n
        else:
            total += 2 * (n + 4 * math.ceil(n / BNB_8BIT_OPTIM_BLOCKSIZE))
    return total


def _hf_layer(s: Shape, a: int, rb: int, r: int, targets: tuple[str, ...], dropout: float) -> tuple[int, int]:
    """(saved, backward temporaries) bytes per token of one recomputed decoder layer on the hf backend.

    a = compute dtype bytes, rb = residual-stream bytes (4 when prepare_model_for_kbit_training upcast
    the norms and embeddings to fp32 under 16-bit compute). Traced through transformers' Qwen2/Llama
    decoder layer, peft's lora.Linear4bit and bitsandbytes' Linear4bit/MatMul4Bit under autocast.
    """
    h, i, q, kv = s.hidden, s.intermediate, s.q_dim, s.kv_dim
    upcast = rb != a
    t = set(targets)
    # RMSNorm saves its fp32 input (a new copy when the stream is 16-bit) and 1/rms; norm 2's input is
    # the attention residual, saved in both cases.
    norms = (4 + (4 * h if rb == 2 else 0)) + (4 + 4 * h)
    if upcast:  # every Linear4bit and every autocast LoRA path keeps its own 16-bit copy of the fp32 input
        qkv_in = a * h * (3 + len(t & {"q_proj", "k_proj", "v_proj"}))
        mlp_in = a * h * (2 + len(t & {"gate_proj", "up_proj"}))
        down_in = a * i * (1 + ("down_proj" in t))
        act = 3 * rb * i  # gate, silu(gate), up: fp32 (Linear4bit returns its input's dtype)
    else:  # one shared 16-bit input per norm output; the SwiGLU product is the down input
        qkv_in, mlp_in, down_in, act = a * h, a * h, a * i, 3 * a * i
    # SDPA (flash / memory-efficient, no S x S matrix) saves q, k, v, out and a fp32 logsumexp per head;
    # the transposed output is made contiguous for o_proj.
    attn = a * (q + 2 * kv) + a * q + 4 * s.heads + a * q
    lora = a * r * len(t)  # lora_A outputs, saved by lora_B
    if dropout > 0:  # peft applies one nn.Dropout per module: its output and a bool mask
        fan_in = {n: v[0] for n, v in s.linears().items()}
        lora += sum((rb + 1) * fan_in[n] for n in t)
    saved = norms + qkv_in + attn + mlp_in + act + down_in + lora
    # Autograd walks the layer backwards and frees each op's saved tensors once their gradients exist, so
    # only the first ops' gradients meet everything saved: at down_proj, dY plus the down input's gradient
    # from the base and the LoRA path (16-bit from each matmul, fp32 after autocast's cast back: rb*i
    # twice while the second is 16-bit). The SwiGLU gradients (3 x rb*i) come after the down inputs they
    # replace were freed. Counting every op's gradients on top of all saved activations, as before,
    # over-predicted the H100 figures of issue 8 by 11-16% as tokens per step grew.
    backward = rb * h + 2 * rb * i + a * i
    return saved, backward


def _unsloth_layer(s: Shape, a: int) -> tuple[int, int]:
    """(saved, backward temporaries) bytes per token of one decoder layer under Unsloth's fast kernels.

    Fast RMSNorm saves its input and 1/rms; LoRA_QKV saves X; RoPE is in place; LoRA_W saves X;
    LoRA_MLP saves X, gate and up (the SwiGLU output is recomputed in backward, in place).
    """
    h, i, q, kv = s.hidden, s.intermediate, s.q_dim, s.kv_dim
    kv_attn = 2 * q if UNSLOTH_SDPA_EXPANDS_GQA else 2 * kv
    attn = a * (q + kv_attn + q + q) + 4 * s.heads  # Q, K, V, out, contiguous out, logsumexp
    saved = 3 * a * h + 8 + attn + 2 * a * i  # norm-1 out, residual, norm-2 out; 1/rms x2; gate, up
    backward = 3 * a * h + a * i  # dY, dX and its residual sum; dW = dY @ down^T (SwiGLU grads in place)
    return saved, backward


def _unsloth_ce_chunk_bytes(tokens: int, vocab: int, free_bytes: int | None, fixed_bytes: int) -> int:
    """Largest per-chunk transient of unsloth_zoo's fused CE (its get_chunk_size, re-derived)."""
    target = min(free_bytes / 2, UNSLOTH_CE_TARGET_CAP) if free_bytes else UNSLOTH_CE_TARGET_CAP
    if 0 < fixed_bytes < target:
        target -= fixed_bytes
    exact = tokens * vocab * LOSS_BYTES_PER_LOGIT / target
    chunks = 1 if exact <= 1 else min(tokens, math.ceil(exact / 4) * 4)
    return math.ceil(tokens / chunks) * vocab * UNSLOTH_CE_LIVE_BYTES_PER_LOGIT


def estimate(
    model: Any,
    *,
    seq_len: int = 2048,
    micro_batch: int = 1,
    lora_r: int = 16,
    target_modules: list[str] | tuple[str, ...] | None = None,
    quantization: str = "nf4",
    dtype: str = "bfloat16",
    gradient_checkpointing: bool | str = True,
    optimizer: str = "adamw_torch",
    backend: str = "unsloth",
    loss: str | None = None,
    lora_dropout: float = 0.0,
    double_quant: bool = True,
    gpu_memory_bytes: int | None = None,
) -> SizeEstimate:
    """Predict the peak memory of training one micro-batch of `micro_batch` x `seq_len` tokens.

    gradient_checkpointing: True = the backend's own (Unsloth: "offload", hf: "on"), or "on" / "offload" /
    "off" / False. loss: "chunked_nll" (TRL's default, both backends), "unsloth_fused" (Unsloth's fused
    CE) or "full" (whole logits). gpu_memory_bytes only matters for Unsloth's fused CE, which sizes its
    chunks from free memory.
    """
    s = load_shape(model)
    if backend not in ("unsloth", "hf"):
        raise FtError(f"backend {backend!r}: expected unsloth or hf")
    if optimizer not in OPTIMIZERS:
        raise FtError(f"optimizer {optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
    # Unsloth forces its own fused CE (not TRL's chunked one); the hf path runs TRL's default.
    loss = loss or ("unsloth_fused" if backend == "unsloth" else "chunked_nll")
    if loss not in LOSSES:
        raise FtError(f"loss {loss!r}: expected one of {', '.join(LOSSES)}")
    if seq_len < 1 or micro_batch < 1 or lora_r < 1:
        raise FtError("seq_len, micro_batch and lora_r must be positive")
    targets = tuple(target_modules or PROJECTIONS)
    unknown = sorted(set(targets) - set(PROJECTIONS))
    if unknown:
        raise FtError(
            f"lora.target_modules: ft size models the seven projections only, not {', '.join(unknown)}"
        )
    gc = {True: "offload" if backend == "unsloth" else "on", False: "off"}.get(
        gradient_checkpointing, gradient_checkpointing
    )
    if gc not in ("on", "offload", "off"):
        raise FtError(f"gradient_checkpointing {gradient_checkpointing!r}: expected on, offload or off")
    if backend == "hf" and gc == "offload":
        gc = "on"  # offloaded checkpointing is Unsloth's; the plain path checkpoints on the GPU
    quant = {"auto": "nf4"}.get(quantization, quantization)
    a = _dtype_bytes(dtype)
    T = micro_batch * seq_len
    h, V, L = s.hidden, s.vocab, s.layers
    counts = s.param_counts()
    notes: list[str] = []

    # Non-quantised parameters: hf+nf4 upcasts them to fp32 (peft prepare_model_for_kbit_training).
    upcast = backend == "hf" and quant == "nf4" and a == 2
    pb = 4 if upcast else a  # bytes of embeddings, LM head, norms, biases
    rb = 4 if upcast else a  # residual stream bytes
    b: dict[str, int] = {}
    if quant == "nf4":
        packed = consts = 0
        for fan_in, fan_out, _ in s.linears().values():
            p, c = _nf4_bytes(fan_in * fan_out, double_quant)
            packed, consts = packed + p * L, consts + c * L
        b["base linear weights (nf4)"] = packed
        b["nf4 quantisation constants"] = consts
    else:
        b["base linear weights (16-bit)" if a == 2 else "base linear weights (fp32)"] = counts["linear"] * a
    b["embeddings"] = counts["embed"] * pb
    b["lm head"] = counts["lm_head"] * pb
    b["norms + biases"] = (counts["norm"] + counts["bias"]) * pb
    if upcast:
        notes.append("hf: peft's prepare_model_for_kbit_training keeps embeddings, LM head and norms in fp32")
    if s.tied:
        notes.append("LM head is tied to the embeddings (no separate copy)")

    lora_sizes = _lora_tensors(s, lora_r, targets)
    n_lora = sum(lora_sizes)
    # peft's autocast_adapter_dtype makes LoRA weights fp32, but TRL 1.14.2's SFTTrainer then casts every
    # trainable parameter of a quantised model to bf16 (sft_trainer.py ~1166, QLoRA paper's recipe) on the
    # stock trainer the hf backend uses. Unsloth rewrites TRL's trainer and keeps them fp32 (the H100
    # figures agree with fp32 there within 3%). Gradients follow the parameters' dtype.
    lb = 2 if backend == "hf" and quant == "nf4" else 4
    lname = "bf16" if lb == 2 else "fp32"
    b[f"lora weights ({lname})"] = lb * n_lora
    b[f"lora gradients ({lname})"] = lb * n_lora
    b["optimizer states"] = _optimizer_bytes(lora_sizes, optimizer, lb)
    if lb == 2:
        notes.append("hf: TRL's SFTTrainer casts the LoRA weights of a quantised model to bf16")
    if optimizer == "paged_adamw_8bit":
        notes.append(
            "paged optimizer states live in CUDA unified memory: on the card, but not in torch's allocated count"
        )
    largest = max(fi * fo for fi, fo, _ in s.linears().values())
    dequant = a * largest if quant == "nf4" else 0  # one linear dequantised to the compute dtype at a time
    if backend == "unsloth":
        b["dequantisation buffer"] = dequant  # Unsloth's global buffer, sized to the largest linear
    b["batch tensors"] = 32 * T  # input_ids, labels, attention mask, position ids (int64)
    b["cuBLAS workspace"] = CUBLAS_WORKSPACE_BYTES
    persistent_alloc = sum(b.values()) - (b["optimizer states"] if optimizer == "paged_adamw_8bit" else 0)

    # Activations.
    if backend == "hf":
        per_saved, per_bwd = _hf_layer(s, a, rb, lora_r, targets, lora_dropout)
        x_saved = rb * h if rb == 4 else 0  # without checkpointing, norm 1 also saves the fp32 layer input
        rope = 2 * T * s.head_dim * rb  # cos/sin for the batch, shared by every layer
    else:
        per_saved, per_bwd = _unsloth_layer(s, a)
        x_saved, rope = a * h, 0  # Unsloth caches cos/sin once (tiny)
    stream = rb  # bytes of the hidden states between layers
    if gc == "off":
        keep = L * (per_saved + x_saved) * T + rope
        keep_name = "saved activations (all layers)"
        layer_extra = {"layer backward temporaries": per_bwd * T}
    else:
        if gc == "offload" and T * h > UNSLOTH_GC_MIN_ELEMENTS:
            keep = (UNSLOTH_GC_GPU_BUFFERS + 1) * stream * T * h
            keep_name = "checkpoint staging buffers (layer inputs offloaded)"
        else:
            keep = L * stream * T * h + rope
            keep_name = "checkpointed layer inputs"
        layer_extra = {
            "recomputed layer activations": per_saved * T,
            "layer backward temporaries": per_bwd * T,
        }
    if backend == "hf" and quant == "nf4":
        layer_extra["dequantised weight (transient)"] = dequant

    final = stream * T * h  # final norm's input, saved at the loss
    if loss == "chunked_nll":
        head_cast = V * h * a if pb != a else 0  # autocast copies an fp32 LM head to 16-bit per chunk
        chunk = TRL_CHUNK_TOKENS * V * LOSS_BYTES_PER_LOGIT
        # gathered valid-token hidden states + their gradient, then one chunk (or the scatter-back)
        loss_terms = {
            "final hidden states (gathered) + grad": 2 * final,
            "loss chunk (logits, log-softmax, grads)": max(head_cast + chunk, final),
        }
        if head_cast:
            notes.append("hf: each CE chunk casts the fp32 LM head to 16-bit (a transient copy)")
    elif loss == "unsloth_fused":
        free = None
        if gpu_memory_bytes:
            free = (
                gpu_memory_bytes
                - CUDA_CONTEXT_BYTES
                - int((persistent_alloc + keep) * (1 + ALLOCATOR_RESERVE_FRACTION))
            )
        chunk = _unsloth_ce_chunk_bytes(T, V, free, a * T * h)
        loss_terms = {"final hidden states + grad": 2 * a * T * h, "fused CE chunk": chunk}
    else:
        loss_terms = {"final hidden states": final, "full logits + CE buffers": T * V * (a + 12)}
    loss_terms = {"final norm input": final, **loss_terms}
    step_terms = {"optimizer step temporaries": lb * n_lora if optimizer == "adamw_torch" else 0}

    phases = {
        "loss": keep + sum(loss_terms.values()),
        "layer backward": keep + sum(layer_extra.values()),
        "optimizer step": sum(step_terms.values()),
    }
    phase = max(phases, key=phases.get)
    b[keep_name] = keep if phase != "optimizer step" else 0
    b.update({"loss": loss_terms, "layer backward": layer_extra, "optimizer step": step_terms}[phase])
    peak = persistent_alloc + phases[phase]
    b["CUDA context (outside allocator)"] = CUDA_CONTEXT_BYTES
    b["allocator reserve (fragmentation)"] = int(peak * ALLOCATOR_RESERVE_FRACTION)
    total = sum(b.values())

    inputs = {
        "model": s.name,
        "model_type": s.model_type,
        "seq_len": seq_len,
        "micro_batch": micro_batch,
        "lora_r": lora_r,
        "target_modules": list(targets),
        "quantization": quant,
        "dtype": dtype,
        "gradient_checkpointing": gc,
        "optimizer": optimizer,
        "backend": backend,
        "loss": loss,
        "lora_dropout": lora_dropout,
        "double_quant": double_quant,
    }
    params = {**counts, "total": s.total_params(), "lora": n_lora}
    return SizeEstimate(
        inputs,
        {k: int(v) for k, v in b.items()},
        int(peak),
        int(total),
        phase,
        {k: int(v) for k, v in phases.items()},
        params,
        notes,
    )


# -- evaluation -----------------------------------------------------------------------------------------
def eval_phases(
    model: Any,
    batch: int,
    *,
    prompt_tokens: int,
    new_tokens: int,
    loss_tokens: int | None = None,
    dtype: str = "bfloat16",
    quantization: str = "nf4",
) -> dict[str, dict[str, int]]:
    """Transient bytes of eval's two phases for `batch` rows, beside the loaded weights.

    generation (transformers 5.17 generate, greedy, DynamicCache): K and V of every layer for prompt +
    new tokens; the prefill's largest layer (its input, norm output and residual, q/k/v and attention
    output, gate/up/SwiGLU); the last position's logits only (generate passes logits_to_keep=1), generate's
    fp32 copy of them and the processed scores. loss (ft.eval.loss): the final hidden states and the
    selected positions, one layer of the forward, and one chunk of logits (16-bit, then fp32).
    A 4-bit linear is dequantised to the compute dtype for a many-token matmul in both.
    """
    from ft.eval.loss import LOGITS_CHUNK_BYTES, chunk_tokens

    s = load_shape(model)
    a = _dtype_bytes(dtype)
    h, i, q, kv, V = s.hidden, s.intermediate, s.q_dim, s.kv_dim, s.vocab
    layer = a * (3 * h + q + 2 * kv + q) + 3 * a * i  # per token of one decoder layer's forward
    largest = max(fi * fo for fi, fo, _ in s.linears().values())
    dequant = a * largest if quantization in ("nf4", "auto") else 0
    P = batch * prompt_tokens
    gen = {
        "KV cache (prompt + new tokens)": 2 * s.layers * kv * (prompt_tokens + new_tokens) * batch * a,
        "prefill: one layer's activations": layer * P,
        "last-position logits (16-bit, fp32 copy, scores)": batch * V * (a + 4 + 4),
        "dequantised weight (transient)": dequant,
    }
    T = batch * (loss_tokens or prompt_tokens + new_tokens)
    chunk = chunk_tokens(V)
    loss = {
        "final hidden states + selected positions": 2 * a * h * T,
        "one layer's activations": layer * T,
        "logits chunk (16-bit, then fp32)": min(LOGITS_CHUNK_BYTES, 4 * V * T) + a * V * min(chunk, T),
        "dequantised weight (transient)": dequant,
    }
    return {"generation": gen, "loss": loss}


def eval_transient_bytes(model: Any, batch: int, **kw) -> int:
    """The larger of eval's two phases (eval_phases) for `batch` rows."""
    return max(sum(terms.values()) for terms in eval_phases(model, batch, **kw).values())


def eval_batch_that_fits(
    model: Any, free_bytes: int, max_batch: int, *, safety: float = FIT_SAFETY_FRACTION, **kw
) -> int:
    """The largest eval batch <= max_batch whose transient memory (with the allocator's reserve) fits in
    `free_bytes` less the safety share; at least 1 (an out-of-memory then steps it down further)."""
    room = free_bytes * (1 - safety)
    for b in range(max(1, max_batch), 0, -1):
        if eval_transient_bytes(model, b, **kw) * (1 + ALLOCATOR_RESERVE_FRACTION) <= room:
            return b
    return 1


def eval_persistent_bytes(est: SizeEstimate) -> int:
    """What eval keeps loaded, from a training estimate's terms: the weights in eval's dtypes (no fp32
    upcast: eval does not call prepare_model_for_kbit_training), the LoRA weights in fp32 (peft's
    from_pretrained autocasts 16-bit adapter weights to fp32) and cuBLAS' workspace."""
    b, p, i = est.breakdown, est.params, est.inputs
    a = _dtype_bytes(i["dtype"])
    linear = sum(v for k, v in b.items() if k.startswith("base linear weights") or k.startswith("nf4 quant"))
    return (
        linear
        + a * (p["embed"] + p["lm_head"] + p["norm"] + p["bias"])
        + 4 * p["lora"]
        + CUBLAS_WORKSPACE_BYTES
    )


def fits(est: SizeEstimate, gpu: Gpu, safety: float = FIT_SAFETY_FRACTION) -> bool:
    return est.total_bytes <= gpu.memory_bytes * (1 - safety)
