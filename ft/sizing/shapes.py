"""Model shapes for sizing: built-in presets of published architectures, and a shape read from any
config.json (plain JSON; transformers only for an uncached Hub id)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ft.errors import FtError


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
