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

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ft.errors import FtError
from ft.sizing.gpus import GIB, Gpu

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


# -- model shapes --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """The numbers of a decoder-only transformer (Llama/Qwen/Mistral family) that memory depends on."""

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    mlp_bias: bool = False

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int, bool]]:
        """Per decoder layer: projection -> (in_features, out_features, has_bias)."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim, self.qkv_bias),
            "k_proj": (h, self.kv_dim, self.qkv_bias),
            "v_proj": (h, self.kv_dim, self.qkv_bias),
            "o_proj": (self.q_dim, h, False),
            "gate_proj": (h, i, self.mlp_bias),
            "up_proj": (h, i, self.mlp_bias),
            "down_proj": (i, h, self.mlp_bias),
        }

    def param_counts(self) -> dict[str, int]:
        lin = self.linears().values()
        per_layer_linear = sum(a * b for a, b, _ in lin)
        per_layer_bias = sum(b for _, b, bias in lin if bias)
        return {
            "linear": self.layers * per_layer_linear,
            "bias": self.layers * per_layer_bias,
            "norm": (2 * self.layers + 1) * self.hidden,
            "embed": self.vocab * self.hidden,
            "lm_head": 0 if self.tied else self.vocab * self.hidden,
        }

    def total_params(self) -> int:
        return sum(self.param_counts().values())

    def to_config(self) -> dict[str, Any]:
        """A config.json for this shape (what the benchmark instantiates with random weights)."""
        arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
        cfg = {
            "architectures": [arch.get(self.model_type, "LlamaForCausalLM")],
            "model_type": self.model_type,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "tie_word_embeddings": self.tied,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 32768,
            "torch_dtype": "bfloat16",
        }
        if self.model_type == "llama":
            cfg.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias, rope_theta=500000.0)
        if self.model_type == "qwen2":
            cfg.update(rope_theta=1000000.0, use_sliding_window=False)
        return cfg


def _qwen2(name, h, i, layers, heads, kv, vocab, tied) -> Shape:
    return Shape(name, "qwen2", h, i, layers, heads, kv, h // heads, vocab, tied, qkv_bias=True)


def _llama(name, h, i, layers, heads, kv, vocab, tied) -> Shape:
    return Shape(name, "llama", h, i, layers, heads, kv, h // heads, vocab, tied)


# The published configs (config.json on the Hub) of common bases, so sizing works offline.
PRESETS: dict[str, Shape] = {
    s.name: s
    for s in [
        _qwen2("qwen2.5-0.5b", 896, 4864, 24, 14, 2, 151936, True),
        _qwen2("qwen2.5-1.5b", 1536, 8960, 28, 12, 2, 151936, True),
        _qwen2("qwen2.5-3b", 2048, 11008, 36, 16, 2, 151936, True),
        _qwen2("qwen2.5-7b", 3584, 18944, 28, 28, 4, 152064, False),
        _qwen2("qwen2.5-14b", 5120, 13824, 48, 40, 8, 152064, False),
        _llama("llama-3.2-1b", 2048, 8192, 16, 32, 8, 128256, True),
        _llama("llama-3.2-3b", 3072, 8192, 28, 24, 8, 128256, True),
        _llama("llama-3.1-8b", 4096, 14336, 32, 32, 8, 128256, False),
    ]
}


def preset_table() -> list[dict[str, Any]]:
    """The built-in shapes, for `ft size --list-models --json`."""
    return [{"name": s.name, "params": s.total_params(), "config": s.to_config()} for s in PRESETS.values()]


def render_presets() -> str:
    """The built-in shapes, one a line, for `ft size --list-models`."""
    lines = [f"{'name':<14} {'params':>9}  {'layers':>6} {'hidden':>6} {'heads/kv':>8} {'vocab':>7}  lm head"]
    for s in PRESETS.values():
        lines.append(
            f"{s.name:<14} {s.total_params() / 1e9:7.2f} B  {s.layers:>6} {s.hidden:>6} "
            f"{f'{s.heads}/{s.kv_heads}':>8} {s.vocab:>7}  {'tied' if s.tied else 'separate'}"
        )
    lines.append(
        "use one as --model NAME; a Hub id such as Qwen/Qwen2.5-7B-Instruct maps to its shape when it is "
        "not in the local cache"
    )
    return "\n".join(lines)


# transformers' per-architecture defaults for keys that save_pretrained omits when they equal the default.
_TIED_DEFAULT = {"gemma": True, "gemma2": True, "gemma3_text": True}
_QKV_BIAS_ALWAYS = {"qwen2"}  # Qwen2Attention builds q/k/v with bias=True regardless of config


def shape_from_config(cfg: dict[str, Any], name: str = "model") -> Shape:
    """A Shape from a config.json mapping (text_config is used for multimodal wrappers)."""
    if isinstance(cfg.get("text_config"), dict):
        cfg = {
            **cfg["text_config"],
            "model_type": cfg["text_config"].get("model_type", cfg.get("model_type")),
        }
    if any(k in cfg for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        raise FtError(f"{name}: mixture-of-experts models are not covered by ft size's memory model")
    try:
        h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        mt = str(cfg.get("model_type", ""))
        return Shape(
            name=name,
            model_type=mt,
            hidden=h,
            intermediate=int(cfg["intermediate_size"]),
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or h // heads),
            vocab=int(cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", _TIED_DEFAULT.get(mt, False))),
            qkv_bias=mt in _QKV_BIAS_ALWAYS or bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise FtError(f"{name}: config.json lacks what ft size needs ({exc})") from None


def _preset_for(name: str) -> Shape | None:
    key = name.strip().lower().rsplit("/", 1)[-1]
    for suffix in ("-instruct", "-bnb-4bit", "-unsloth-bnb-4bit"):
        key = key.removesuffix(suffix)
    key = key.replace("meta-llama-", "llama-")
    return PRESETS.get(key)


def _hub_cached_config(repo_id: str, revision: str | None) -> dict | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return None
    path = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return json.loads(Path(path).read_text()) if isinstance(path, str) else None


def load_shape(model: Any, *, revision: str | None = None, trust_remote_code: bool = False) -> Shape:
    """A Shape from: a Shape, a config mapping or object, a preset name, a local directory or a Hub id.

    A local directory's config.json is read as plain JSON (fast); a Hub id is looked up in the local
    Hugging Face cache first, then among the presets (`Qwen/Qwen2.5-7B-Instruct` -> `qwen2.5-7b`), and
    only then fetched with transformers' AutoConfig.
    """
    if isinstance(model, Shape):
        return model
    if isinstance(model, dict):
        return shape_from_config(model)
    if not isinstance(model, (str, Path)):
        to_dict = getattr(model, "to_dict", None)
        if to_dict is None:
            raise FtError(f"cannot size {type(model).__name__}: give a config, a directory or a model name")
        return shape_from_config(to_dict(), getattr(model, "name_or_path", "") or "model")
    text = str(model)
    if text.lower() in PRESETS:
        return PRESETS[text.lower()]
    from ft.modelref import is_builtin, resolve_model_path

    if is_builtin(text) or Path(text).expanduser().exists():
        path = Path(resolve_model_path(text))
        return shape_from_config(json.loads((path / "config.json").read_text()), text)
    resolve_model_path(text)  # raises the usual error for a missing local path
    cached = _hub_cached_config(text, revision)
    if cached is not None:
        return shape_from_config(cached, text)
    preset = _preset_for(text)
    if preset is not None:
        return preset
    from ft.modelref import load_config

    return shape_from_config(load_config(text, revision, trust_remote_code).to_dict(), text)


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


# -- compute and time ----------------------------------------------------------------------------------
def flops_per_token(
    shape: Shape, seq_len: int, *, gradient_checkpointing: bool, lora_params: int = 0
) -> float:
    """Training FLOPs executed per token with a frozen base.

    Matmul weights N = the decoder layers' linears (N_layers) + the LM head (the embedding lookup is free).
    Forward 2N; backward 2N (input gradients only: the frozen base gets no weight gradients); under
    checkpointing the decoder layers run forward again (2 N_layers: the LM head is not recomputed). Causal
    attention averages seq_len/2 keys: 2 x 2 x q_dim x seq_len/2 = 2 q_dim seq_len forward FLOPs per layer
    and token, twice that in backward, once more when recomputed. Each LoRA parameter costs 6 (forward,
    input gradient, weight gradient), 2 more when recomputed.

    With gradient_checkpointing=False this is the *model* FLOPs of model-FLOPs utilisation (MFU), which by
    definition does not count recomputation; the wall-time estimate uses the executed FLOPs."""
    n_layers = shape.param_counts()["linear"]
    n_head = shape.vocab * shape.hidden
    attn = 2 * shape.layers * shape.q_dim * seq_len
    flops = 4 * (n_layers + n_head) + 3 * attn + 6 * lora_params
    if gradient_checkpointing:
        flops += 2 * n_layers + attn + 2 * lora_params
    return float(flops)


def model_flops_per_token(shape: Shape, seq_len: int, lora_params: int = 0) -> float:
    """FLOPs per token the training needs (no recomputation): the numerator of MFU."""
    return flops_per_token(shape, seq_len, gradient_checkpointing=False, lora_params=lora_params)


def mfu(shape: Shape, seq_len: int, tokens_per_s: float, peak_tflops: float, lora_params: int = 0) -> float:
    """Model-FLOPs utilisation: model FLOPs per second over the GPU's dense bf16 peak."""
    return model_flops_per_token(shape, seq_len, lora_params) * tokens_per_s / (peak_tflops * 1e12)


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


def fits(est: SizeEstimate, gpu: Gpu, safety: float = FIT_SAFETY_FRACTION) -> bool:
    return est.total_bytes <= gpu.memory_bytes * (1 - safety)


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
        if self.probe:
            p = self.probe
            err = (e.peak_allocated_bytes - p["peak_allocated_bytes"]) / p["peak_allocated_bytes"]
            out.append(
                f"probe ({p['steps']} steps at micro-batch {p['micro_batch']} x {p['seq_len']}): measured peak "
                f"{p['peak_allocated_bytes'] / GIB:.2f} GiB vs predicted {e.peak_allocated_bytes / GIB:.2f} GiB "
                f"({err:+.1%}), {p['tokens_per_s']:.0f} tokens/s"
            )
        return "\n".join(out)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _count_rows(settings) -> int | None:
    """Training rows from a cheap line count of the JSONL files (JSON arrays: unknown)."""
    from ft.config import resolve_path

    rows = 0
    for spec in settings.data.train:
        path = resolve_path(spec)
        if path.suffix != ".jsonl" or not path.is_file():
            return None
        with open(path, "rb") as f:
            rows += sum(1 for line in f if line.strip())
    if not settings.data.eval:
        rows -= min(math.ceil(rows * settings.data.eval_fraction), settings.data.eval_max_rows)
    return max(rows, 0)


def _stat(stats: dict[str, Any], *keys: str) -> float | None:
    for k in keys:
        if stats.get(k) is not None:
            return float(stats[k])
    return None


def _eta(
    settings,
    shape: Shape,
    est: SizeEstimate,
    gpu: Gpu | None,
    data_stats: dict | None,
    measured_tps: float | None,
) -> dict[str, Any]:
    t = settings.train
    stats = data_stats or {}
    rows = _stat(stats, "train_rows", "rows", "n_train")
    rows_source = "data check" if rows is not None else "line count of the training files"
    if rows is None:
        counted = _count_rows(settings)
        rows = float(counted) if counted is not None else None
    mean_tokens = _stat(stats, "mean_tokens", "tokens_mean", "mean_tokens_per_row")
    if mean_tokens is not None:
        tok_source = "mean tokens per row from the data check"
    else:
        mean_tokens, tok_source = float(t.max_seq_length), "upper bound: every row at max_seq_length"
    if t.max_steps:
        steps = t.max_steps
    elif rows:
        steps = math.ceil(math.ceil(rows / t.effective_batch) * t.epochs)
    else:
        return {"why": "number of training rows unknown: run `ft data check`"}
    tokens = steps * t.effective_batch * mean_tokens
    fpt = flops_per_token(
        shape,
        t.max_seq_length,
        gradient_checkpointing=est.inputs["gradient_checkpointing"] != "off",
        lora_params=est.params["lora"],
    )
    out: dict[str, Any] = {
        "steps": steps,
        "rows": rows,
        "rows_source": rows_source,
        "tokens": tokens,
        "tokens_source": tok_source,
        "flops_per_token": fpt,
    }
    if measured_tps:
        out.update(tokens_per_s=measured_tps, tokens_per_s_source="measured by --probe")
    elif gpu is not None and gpu.bf16_tflops:
        backend = est.inputs["backend"]
        util = MEASURED_FLOP_UTILISATION[backend]
        matmul_peak = gpu.bf16_tflops * MATMUL_PEAK_FRACTION
        out.update(
            tokens_per_s=matmul_peak * 1e12 * util / (6 * shape.total_params()),
            tokens_per_s_source=(
                f"{util:.0%} FLOP utilisation ({backend}, measured: {UTILISATION_SOURCE}) of a bf16 matmul "
                f"peak of {matmul_peak:.0f} TFLOP/s ({MATMUL_PEAK_FRACTION:.0%} of the {gpu.bf16_tflops:g} "
                "datasheet figure, as measured on the H100), 6 x params FLOPs per token"
            ),
        )
    else:
        out["why"] = "GPU peak FLOP/s unknown: name a GPU (--gpu h100) or measure with --probe"
        return out
    out["seconds"] = tokens / out["tokens_per_s"]
    return out


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
) -> SizeReport:
    """Predict the recipe's peak memory against a GPU (named, an amount, or the one present).

    backend: (name, reason) of the backend training will use, when the caller already chose it; else
    it is resolved the way `backend: auto` would resolve on a CUDA machine (`resolve_backend`).
    """
    from ft.sizing import gpus

    if micro_batch is not None and micro_batch < 1:
        raise FtError(f"--micro-batch {micro_batch}: must be at least 1")
    device = gpus.resolve(gpu) if not isinstance(gpu, Gpu) else gpu
    m, t = settings.model, settings.train
    shape = load_shape(m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    backend, reason = backend or resolve_backend(settings, shape, device)
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
            **getattr(impl, "sft_config_overrides", lambda _: {})(settings),
        )
        trainer = impl.trainer_class()(
            model=loaded.model,
            args=cfg,
            train_dataset=_to_dataset(rows),
            processing_class=loaded.tokenizer,
            callbacks=[Measure()],
        )
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
