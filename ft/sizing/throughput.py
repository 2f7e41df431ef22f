"""Compute and wall time: FLOPs per token, utilisation, and the ETA `ft size` prints."""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation
from typing import Any

from ft.errors import FtError
from ft.sizing.gpus import Gpu
from ft.sizing.memory import (
    MATMUL_PEAK_FRACTION,
    MEASURED_FLOP_UTILISATION,
    UTILISATION_SOURCE,
    SizeEstimate,
)
from ft.sizing.shapes import Shape


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


_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}


def _whole(flag: str, text: str) -> int:
    """`75000`, `75k`, `3.1M`, `3.1e6` -> a whole number of at least 1, else a one-line error."""
    raw = str(text).strip().replace("_", "").replace(",", "")
    unit = raw[-1:].lower() if raw[-1:].lower() in "kmb" else ""
    try:  # Decimal: 1.1k is exactly 1100, not 1100.0000000000002
        value = Decimal(raw[: len(raw) - len(unit)]) * _SUFFIX[unit]
    except InvalidOperation:
        value = Decimal(0)
    if not value.is_finite() or value < 1 or value != value.to_integral_value():
        raise FtError(f"{flag} {text}: must be a whole number of at least 1 (e.g. 75000, 75k, 3.1M)")
    return int(value)


def stated_data(settings, rows: str | int | None = None, tokens: str | int | None = None) -> dict | None:
    """The ETA's data size as the user states it (`ft size --rows N --tokens N`), for data that is not
    at hand (a full file the recipe ships only a sample of) or not checked yet.

    rows: rows of the training files; tokens: their total under the chat template. Both as `ft data
    check` reports them ("rows read", "tokens total"). The held-out split is taken off the rows the way
    the check takes it (when data.eval is empty), and its share of the tokens with it. None: neither given.
    """
    if rows is None and tokens is None:
        return None
    if rows is None:
        raise FtError("--tokens needs --rows: the ETA counts steps from rows, tokens a row from both")
    n = _whole("--rows", rows)
    d = settings.data
    held = 0 if d.eval else min(math.ceil(n * d.eval_fraction), d.eval_max_rows)
    out: dict[str, Any] = {
        "train_rows": max(n - held, 0),
        "rows_source": f"--rows {n:,}" + (f" less the {held:,} held out" if held else ""),
    }
    if tokens is not None:
        total = _whole("--tokens", tokens)
        out["mean_tokens"] = total / n
        out["tokens_source"] = f"--tokens {total:,} over --rows {n:,}: {total / n:.1f} tokens a row"
    return out


_UPPER = "upper bound: every row at max_seq_length"
# How full best-fit packing leaves a sequence, for an ETA from the mean row length alone
PACKED_FILL = 0.95


def _packed(t, stats: dict[str, Any], rows: float, mean_tokens: float | None) -> dict[str, Any]:
    """Packed sequences an epoch under train.packing, and the real tokens in each (ft.train.packing)."""
    seq = t.max_seq_length
    tokens = stats.get("tokens")
    hist = tokens.get("histogram") if isinstance(tokens, dict) else None
    if hist and hist.get("counts"):  # the data check's report: pack its length histogram for real
        from ft.train.packing import pack

        edges = hist["edges"]
        lengths = [min(edges[i + 1] - 1, seq) for i, n in enumerate(hist["counts"]) for _ in range(n)]
        sequences = max(math.ceil(len(pack(lengths, seq)) * rows / len(lengths)), 1)
        mean = mean_tokens or sum(lengths) / len(lengths)
        source = "best-fit packing of the data check's length histogram, rows at their bin's top"
    elif mean_tokens:
        mean, sequences = mean_tokens, max(math.ceil(rows * mean_tokens / (seq * PACKED_FILL)), 1)
        source = (
            f"total tokens / max_seq_length at {PACKED_FILL:.0%} full: best-fit packing filled 91-99% of "
            "each sequence on ticket-like rows (benchmarks/packing.py)"
        )
    else:
        return {
            "sequences": rows,
            "tokens_per_sequence": float(seq),
            "source": "at most one row a sequence: row lengths unknown (run `ft data check`, or pass --tokens)",
        }
    return {"sequences": sequences, "tokens_per_sequence": rows * mean / sequences, "source": source}


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
    counted_source = "line count of the training files"
    rows_source = stats.get("rows_source", "data check") if rows is not None else counted_source
    if rows is None:
        counted = _count_rows(settings)
        rows = float(counted) if counted is not None else None
    mean_tokens = _stat(stats, "mean_tokens", "tokens_mean", "mean_tokens_per_row")
    if mean_tokens is not None:
        tok_source = stats.get("tokens_source", "mean tokens per row from the data check")
    else:
        mean_tokens, tok_source = float(t.max_seq_length), _UPPER
    # train.packing: steps count packed sequences, each max_seq_length at most and without padding
    known_mean = mean_tokens if tok_source != _UPPER else None
    packed = _packed(t, stats, rows, known_mean) if t.packing and rows else None
    if t.max_steps:
        steps = t.max_steps
    elif rows:
        sequences = packed["sequences"] if packed else rows
        steps = math.ceil(math.ceil(sequences / t.effective_batch) * t.epochs)
    else:
        return {"why": "number of training rows unknown: run `ft data check`"}
    tokens = steps * t.effective_batch * (packed["tokens_per_sequence"] if packed else mean_tokens)
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
        **({"packing": packed} if packed else {}),
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
