"""ft size: each term of the memory model against a hand computation, its monotonicity, the GPU
catalogue, the micro-batch search and the benchmark's dry run. No GPU needed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ft import sizing
from ft.errors import FtError
from ft.sizing.gpus import CATALOGUE, GIB, parse_amount, parse_gpu

ROOT = Path(__file__).resolve().parents[1]

# Qwen2.5-7B's config.json (hidden 3584, intermediate 18944, 28 layers, 28 heads / 4 KV heads of 128,
# vocab 152064, untied LM head, q/k/v with bias).
H, FF, L, HEADS, KV, D, V = 3584, 18944, 28, 28, 4, 128, 152064
KVD = KV * D
LINEARS = {  # per layer: (in, out)
    "q_proj": (H, H),
    "k_proj": (H, KVD),
    "v_proj": (H, KVD),
    "o_proj": (H, H),
    "gate_proj": (H, FF),
    "up_proj": (H, FF),
    "down_proj": (FF, H),
}


def est7b(**kw):
    args = {"seq_len": 2048, "micro_batch": 2, "backend": "hf"} | kw
    return sizing.estimate("qwen2.5-7b", **args)


def test_qwen25_7b_parameter_count_matches_the_published_size():
    linear = L * sum(a * b for a, b in LINEARS.values())
    bias = L * (H + 2 * KVD)
    norms = (2 * L + 1) * H
    counts = sizing.PRESETS["qwen2.5-7b"].param_counts()
    assert counts == {"linear": linear, "bias": bias, "norm": norms, "embed": V * H, "lm_head": V * H}
    total = linear + bias + norms + 2 * V * H
    assert sizing.PRESETS["qwen2.5-7b"].total_params() == total
    assert round(total / 1e9, 2) == 7.62  # Qwen reports 7.61 B (7,615,616,512)
    assert total == 7_615_616_512


def test_nf4_weights_and_quantisation_constants_by_hand():
    b = est7b().breakdown
    packed = sum(L * (a * o // 2) for a, o in LINEARS.values())  # two 4-bit codes per byte
    assert b["base linear weights (nf4)"] == packed
    consts = 0
    for a, o in LINEARS.values():
        blocks = a * o // 64  # every matrix here is a multiple of 64 values
        # uint8 absmax per 64-block, an fp32 absmax per 256 blocks, the 256-entry fp32 map + offset, NF4 code book
        consts += L * (blocks + 4 * math.ceil(blocks / 256) + 1028 + 64)
    assert b["nf4 quantisation constants"] == consts
    bits_per_param = 8 * consts / sum(L * a * o for a, o in LINEARS.values())
    assert bits_per_param == pytest.approx(8 / 64 + 32 / (64 * 256), abs=1e-3)  # ~0.127

    no_dq = est7b(double_quant=False).breakdown["nf4 quantisation constants"]
    assert no_dq == sum(
        L * (4 * (a * o // 64) + 64) for a, o in LINEARS.values()
    )  # fp32 absmax: 0.5 bit/param


def test_sixteen_bit_terms_per_backend():
    hf, us = est7b(backend="hf").breakdown, est7b(backend="unsloth").breakdown
    # hf: prepare_model_for_kbit_training upcasts everything that is not 4-bit to fp32
    assert hf["embeddings"] == hf["lm head"] == V * H * 4
    assert hf["norms + biases"] == ((2 * L + 1) * H + L * (H + 2 * KVD)) * 4
    # Unsloth keeps them in bf16
    assert us["embeddings"] == us["lm head"] == V * H * 2
    tied = sizing.estimate("qwen2.5-0.5b", backend="unsloth").breakdown
    assert tied["lm head"] == 0 and tied["embeddings"] == 151936 * 896 * 2


def test_lora_weights_gradients_and_optimizer_states_by_hand():
    n = 16 * L * sum(a + o for a, o in LINEARS.values())  # A: r x in, B: out x r
    assert n == 40_370_176
    b = est7b().breakdown  # hf: TRL's SFTTrainer casts a quantised model's LoRA weights to bf16
    assert b["lora weights (bf16)"] == 2 * n
    assert b["lora gradients (bf16)"] == 2 * n
    assert b["optimizer states"] == 4 * n  # AdamW: exp_avg + exp_avg_sq in the parameters' dtype
    u = est7b(backend="unsloth").breakdown  # Unsloth keeps them fp32
    assert u["lora weights (fp32)"] == u["lora gradients (fp32)"] == 4 * n
    assert u["optimizer states"] == 8 * n
    assert est7b(quantization="none").breakdown["lora weights (fp32)"] == 4 * n  # no cast without 4-bit
    eight = est7b(optimizer="adamw_8bit").breakdown["optimizer states"]
    expect = 0
    for a, o in LINEARS.values():
        for size in (16 * a, o * 16):  # every LoRA matrix of the 7B has >= 4096 values: all 8-bit
            expect += L * 2 * (size + 4 * math.ceil(size / 256))
    assert eight == expect
    # Qwen2.5-0.5B's k/v LoRA B (128 x 16 = 2048 values) stays in 32-bit state under bitsandbytes' rule
    small = sizing.estimate("qwen2.5-0.5b", optimizer="adamw_8bit", target_modules=["k_proj"])
    assert small.breakdown["optimizer states"] == 24 * (
        2 * (16 * 896 + 4 * math.ceil(16 * 896 / 256)) + 8 * 2048
    )


def test_activation_terms_by_hand_hf():
    T = 2 * 2048
    e = est7b(backend="hf", micro_batch=2, seq_len=2048)
    assert e.phase == "layer backward"
    b = e.breakdown
    # every layer's fp32 input stays on the GPU, plus the batch's cos/sin (fp32, head_dim 128)
    assert b["checkpointed layer inputs"] == L * 4 * T * H + 2 * T * D * 4
    # one recomputed layer, bytes per token (fp32 residual stream, bf16 compute, r=16 on all 7):
    norms = 8 + 4 * H  # 1/rms of both norms; norm 2 saves its fp32 input (the residual)
    qkv_in = 2 * H * 6  # q, k, v: bitsandbytes' bf16 copy + autocast's LoRA copy, each
    mlp_in = 2 * H * 4  # gate, up: likewise
    down_in = 2 * FF * 2
    act = 4 * FF * 3  # gate, silu(gate), up in fp32
    attn = 2 * (H + 2 * KVD) + 2 * H + 4 * HEADS + 2 * H  # q, k, v, out, logsumexp, contiguous out
    lora = 2 * 16 * 7
    per_token = norms + qkv_in + mlp_in + down_in + act + attn + lora
    assert per_token == 413_016
    assert b["recomputed layer activations"] == per_token * T
    # the down_proj backward meets everything saved: dY (fp32), the down input's gradient from the base
    # and the LoRA path (fp32 twice, one still bf16); the SwiGLU gradients come after those inputs are freed
    assert b["layer backward temporaries"] == (4 * H + 2 * 4 * FF + 2 * FF) * T
    assert b["dequantised weight (transient)"] == 2 * H * FF  # the largest linear in bf16
    assert (
        sum(v for k, v in b.items() if "CUDA context" not in k and "allocator" not in k)
        == e.peak_allocated_bytes
    )
    assert sum(b.values()) == e.total_bytes


def test_activation_terms_by_hand_unsloth():
    T = 2 * 2048
    b = est7b(backend="unsloth").breakdown
    # offloaded checkpointing: two staging buffers + the last layer's input, bf16
    assert b["checkpoint staging buffers (layer inputs offloaded)"] == 3 * 2 * T * H
    per_token = 3 * 2 * H + 8 + 2 * (H + 2 * H + H + H) + 4 * HEADS + 2 * 2 * FF  # K/V expanded to 28 heads
    assert b["recomputed layer activations"] == per_token * T
    assert b["dequantisation buffer"] == 2 * H * FF
    # a tiny batch is not offloaded (below unsloth_zoo's 2 MiB threshold): all layer inputs stay
    small = sizing.estimate("qwen2.5-0.5b", backend="unsloth", seq_len=64, micro_batch=1).breakdown
    assert small["checkpointed layer inputs"] == 24 * 2 * 64 * 896


def test_whole_peak_by_hand_unsloth_7b_at_2x2048():
    """Every term of one prediction from the published config alone, then the phase rule."""
    T, n_lora = 2 * 2048, 40_370_176
    packed = sum(L * (a * o // 2) for a, o in LINEARS.values())
    consts = sum(
        L * ((a * o // 64) + 4 * math.ceil(a * o // 64 / 256) + 1028 + 64) for a, o in LINEARS.values()
    )
    persistent = (
        packed
        + consts
        + 2 * V * H  # embeddings, bf16
        + 2 * V * H  # untied LM head, bf16
        + 2 * ((2 * L + 1) * H + L * (H + 2 * KVD))  # norms + q/k/v biases, bf16
        + (4 + 4 + 8) * n_lora  # LoRA weights, gradients, AdamW states (fp32)
        + 2 * H * FF  # Unsloth's dequantisation buffer: the largest linear in bf16
        + 32 * T  # input_ids, labels, attention mask, position ids (int64)
        + (32 << 20)  # cuBLAS workspace
    )
    staging = 3 * 2 * T * H  # two offload staging buffers + the last layer's input, bf16
    recomputed = (3 * 2 * H + 8 + 2 * (H + 2 * H + H + H) + 4 * HEADS + 2 * 2 * FF) * T
    backward = (3 * 2 * H + 2 * FF) * T
    e = est7b(backend="unsloth")
    assert e.phases["layer backward"] == staging + recomputed + backward == 877_101_056
    assert e.phase == "layer backward" and e.phases["loss"] < e.phases["layer backward"]
    assert e.peak_allocated_bytes == persistent + staging + recomputed + backward
    reserve = int(e.peak_allocated_bytes * 0.08)
    assert e.total_bytes == e.peak_allocated_bytes + (600 << 20) + reserve


def test_loss_terms():
    # TRL's chunked_nll: 256-token chunks; the hf backend also casts the fp32 LM head to bf16 per chunk
    e = sizing.estimate("qwen2.5-0.5b", backend="hf", seq_len=512, micro_batch=1)
    assert e.phases["loss"] > 0
    full = sizing.estimate("qwen2.5-7b", backend="unsloth", seq_len=4096, loss="full")
    assert full.phase == "loss"
    assert full.breakdown["full logits + CE buffers"] == 4096 * V * (2 + 12)
    fused = sizing.estimate("qwen2.5-7b", backend="unsloth", seq_len=4096, loss="unsloth_fused")
    chunk = fused.phases["loss"] - fused.breakdown.get(
        "checkpoint staging buffers (layer inputs offloaded)", 0
    )
    assert chunk < full.breakdown["full logits + CE buffers"]


@pytest.mark.parametrize("backend", ["hf", "unsloth"])
def test_monotonic_in_sequence_batch_and_rank(backend):
    def peak(**kw):
        # TRL's chunked loss: Unsloth's fused CE re-derives unsloth_zoo's chunk count (rounded to a
        # multiple of 4), so its loss phase is not monotonic in tokens by construction.
        args = {
            "seq_len": 1024,
            "micro_batch": 2,
            "lora_r": 16,
            "backend": backend,
            "loss": "chunked_nll",
        } | kw
        return sizing.estimate("qwen2.5-1.5b", **args).peak_allocated_bytes

    # From 512 tokens up: below 2 x 256 x 1536 values Unsloth does not offload layer inputs at all, so
    # there a shorter sequence can need slightly *more* (checked in test_unsloth_offload_threshold).
    seqs = [peak(seq_len=s) for s in (512, 1024, 2048, 4096, 8192)]
    batches = [peak(micro_batch=m) for m in (1, 2, 4, 8, 16)]
    ranks = [peak(lora_r=r) for r in (4, 8, 16, 32, 64, 128)]
    for series in (seqs, batches, ranks):
        assert all(a < b for a, b in zip(series, series[1:], strict=False)), series
    assert peak(gradient_checkpointing=False) > peak()
    assert peak(optimizer="adamw_8bit") < peak()


def test_unsloth_offload_threshold():
    below = sizing.estimate("qwen2.5-1.5b", seq_len=256, micro_batch=2, backend="unsloth").breakdown
    above = sizing.estimate("qwen2.5-1.5b", seq_len=512, micro_batch=2, backend="unsloth").breakdown
    assert below["checkpointed layer inputs"] == 28 * 2 * 512 * 1536  # all 28 layer inputs on the GPU
    assert above["checkpoint staging buffers (layer inputs offloaded)"] == 3 * 2 * 1024 * 1536


def test_unsloth_needs_less_than_hf_for_the_same_run():
    for model in ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"):
        hf = sizing.estimate(model, seq_len=2048, micro_batch=2, backend="hf").peak_allocated_bytes
        us = sizing.estimate(model, seq_len=2048, micro_batch=2, backend="unsloth").peak_allocated_bytes
        assert us < hf


def test_bad_inputs_are_ft_errors():
    with pytest.raises(FtError, match="backend"):
        sizing.estimate("qwen2.5-0.5b", backend="vllm")
    with pytest.raises(FtError, match="target_modules"):
        sizing.estimate("qwen2.5-0.5b", target_modules=["lm_head"])
    with pytest.raises(FtError, match="mixture-of-experts"):
        sizing.estimate({**sizing.PRESETS["qwen2.5-0.5b"].to_config(), "num_experts": 8})
    with pytest.raises(FtError, match="lacks"):
        sizing.estimate({"model_type": "llama"})


# -- model configs ---------------------------------------------------------------------------------
def test_preset_config_roundtrips_and_hub_ids_map_to_presets(tmp_path):
    for name, shape in sizing.PRESETS.items():
        again = sizing.shape_from_config(shape.to_config(), name)
        assert again == shape
    assert sizing.load_shape("Qwen/Qwen2.5-7B-Instruct") == sizing.PRESETS["qwen2.5-7b"]
    assert sizing.load_shape("meta-llama/Llama-3.1-8B-Instruct") == sizing.PRESETS["llama-3.1-8b"]
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(sizing.PRESETS["llama-3.1-8b"].to_config()))
    shape = sizing.load_shape(str(d))
    assert (shape.hidden, shape.kv_heads, shape.tied, shape.qkv_bias) == (4096, 8, False, False)


def test_tiny_model_from_ft_testing(tiny_model_dir):
    e = sizing.estimate(str(tiny_model_dir), seq_len=128, micro_batch=8, backend="hf", quantization="none")
    shape = sizing.load_shape(str(tiny_model_dir))
    assert (shape.hidden, shape.layers, shape.tied, shape.model_type) == (64, 2, True, "qwen2")
    assert e.params["total"] == shape.total_params() > 0
    assert "base linear weights (16-bit)" in e.breakdown
    assert e.total_bytes > e.peak_allocated_bytes > 0
    assert "peak allocated" in e.render()


def test_local_config_is_read_without_torch_and_fast(tmp_path):
    d = tmp_path / "qwen7b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(sizing.PRESETS["qwen2.5-7b"].to_config()))
    code = (
        "import sys, time; t = time.perf_counter(); from ft import sizing; "
        f"e = sizing.estimate({str(d)!r}, seq_len=4096, micro_batch=4); "
        "print(round(time.perf_counter() - t, 3), 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    seconds, torch_loaded, transformers_loaded = out.stdout.split()
    print(f"\nft size on a local config: {seconds} s (budget 2 s) in a fresh interpreter")
    assert (torch_loaded, transformers_loaded) == ("False", "False")


# -- GPUs -------------------------------------------------------------------------------------------
def test_gpu_amounts_and_names():
    assert parse_amount("24GiB") == 24 * GIB
    assert parse_amount("80GB") == 80 * 10**9
    assert parse_amount("16G") == 16 * GIB
    assert parse_amount("512MiB") == 512 << 20
    assert parse_amount("rtx4090") is None
    assert parse_amount("24") is None  # a unit is required
    assert parse_gpu("24GiB").memory_bytes == 24 * GIB
    assert parse_gpu("80GB").memory_bytes == 80 * 10**9
    assert parse_gpu("RTX4090") is CATALOGUE["rtx4090"]
    assert parse_gpu("a100-80gb").memory_bytes == 80 * GIB
    assert parse_gpu("H100").bf16_tflops == pytest.approx(989.4)
    # what the driver reports, not the marketing size: an "80 GB" H100 has 79.6 GiB, a "24 GB" L4 22.5
    assert parse_gpu("h100").memory_bytes == 81559 << 20
    assert parse_gpu("l4").memory_bytes == 23034 << 20
    assert parse_gpu("4090") is CATALOGUE["rtx4090"]
    for name in ("rtx3090", "a10g", "l4", "a100-40gb", "h200", "rtx4060-laptop-8gb"):
        assert parse_gpu(name).name == name


def test_unknown_gpu_name_suggests():
    with pytest.raises(FtError, match=r"did you mean 'rtx4090'"):
        parse_gpu("rtx4900")
    with pytest.raises(FtError, match="unknown GPU"):
        parse_gpu("voodoo2")
    with pytest.raises(FtError, match="unknown GPU"):
        parse_gpu("24")


def test_device_names_match_catalogue():
    from ft.sizing.gpus import match_name

    assert match_name("NVIDIA H100 80GB HBM3", 80 * GIB).name == "h100"
    assert match_name("NVIDIA A100-SXM4-40GB", 40 * GIB).name == "a100-40gb"
    assert match_name("NVIDIA GeForce RTX 4090", 24 * GIB).name == "rtx4090"
    assert match_name("NVIDIA L4", 24 * GIB).name == "l4"
    assert match_name("NVIDIA L40S", 48 * GIB).name == "l40s"
    assert match_name("Some Future GPU", 24 * GIB) is None


# -- the report: micro-batch search, accumulation, time ---------------------------------------------
@pytest.fixture
def gpu_settings(tiny_settings):
    def make(model="qwen2.5-0.5b", **kw):
        base = {
            "model.name_or_path": model,
            "model.quantization": "auto",
            "model.dtype": "auto",
            "train.device": "auto",
            "train.backend": "hf",
            "train.micro_batch": "auto",
            "train.effective_batch": 16,
            "train.max_seq_length": 2048,
            "train.gradient_checkpointing": True,
        }
        return tiny_settings(**(base | kw))

    return make


def test_max_micro_batch_is_the_largest_fitting_divisor(gpu_settings):
    s = gpu_settings("qwen2.5-1.5b")
    gpu = parse_gpu("24GiB")
    r = sizing.size_report(s, gpu="24GiB")
    assert r.max_micro_batch is not None and 16 % r.max_micro_batch == 0
    assert r.grad_accum * r.max_micro_batch == 16  # the effective batch is kept
    kw = {"seq_len": 2048, "backend": "hf", "gpu_memory_bytes": gpu.memory_bytes}
    assert sizing.fits(sizing.estimate("qwen2.5-1.5b", micro_batch=r.max_micro_batch, **kw), gpu)
    bigger = [d for d in (1, 2, 4, 8, 16) if d > r.max_micro_batch]
    for d in bigger:
        assert not sizing.fits(sizing.estimate("qwen2.5-1.5b", micro_batch=d, **kw), gpu)
    assert r.fits is True and r.headroom_bytes > 0
    assert r.estimate.inputs["micro_batch"] == r.max_micro_batch
    text = r.render()
    assert "FITS" in text and "gradient accumulation" in text


def test_nothing_fits_on_a_tiny_card(gpu_settings):
    r = sizing.size_report(gpu_settings("qwen2.5-7b"), gpu="4GiB")
    assert r.fits is False and r.max_micro_batch is None and r.grad_accum is None
    assert r.headroom_bytes < 0
    assert "DOES NOT FIT" in r.render() and "not even micro-batch 1" in r.render()


def test_report_without_gpu_is_prediction_only(gpu_settings, monkeypatch):
    monkeypatch.setattr("ft.sizing.gpus.detect", lambda: None)
    r = sizing.size_report(gpu_settings(), micro_batch=4)
    assert r.gpu is None and r.fits is None and r.max_micro_batch is None
    assert r.estimate.inputs["micro_batch"] == 4
    assert "prediction only" in r.render()
    json.dumps(r.to_dict())  # serialisable for --json


def test_eta_from_data_stats_and_measured_utilisation(gpu_settings):
    # Issue 8's H100 figures: 0.57 (Unsloth) / 0.29 (hf) of 6 x params FLOPs per token against a measured
    # bf16 matmul peak of ~798 TFLOP/s (81% of the H100 SXM datasheet's 989.4), 7B shape at 2 x 2048.
    s = gpu_settings("qwen2.5-7b", **{"train.epochs": 2.0})
    r = sizing.size_report(s, gpu="h100", data_stats={"train_rows": 1000, "mean_tokens": 300})
    steps = math.ceil(1000 / 16) * 2
    assert r.eta["steps"] == steps
    assert r.eta["tokens"] == steps * 16 * 300
    params = sizing.PRESETS["qwen2.5-7b"].total_params()
    tps = 0.29 * 798e12 / (6 * params)
    assert r.eta["tokens_per_s"] == pytest.approx(tps, rel=0.01)
    assert r.eta["seconds"] == pytest.approx(steps * 16 * 300 / tps, rel=0.01)
    source = r.eta["tokens_per_s_source"]
    assert "29% FLOP utilisation" in source and "H100" in source and "6 x params" in source
    unsloth = sizing.size_report(
        gpu_settings("qwen2.5-7b", **{"train.backend": "unsloth"}),
        gpu="h100",
        data_stats={"train_rows": 1000},
    )
    assert unsloth.eta["tokens_per_s"] == pytest.approx(0.57 * 798e12 / (6 * params), rel=0.01)
    assert "ETA assumes" in unsloth.render() and "--probe" in unsloth.render()
    measured = sizing.size_report(
        s, gpu="h100", data_stats={"rows": 1000}, probe_result={"tokens_per_s": 5000.0}
    )
    assert measured.eta["tokens_per_s"] == 5000.0 and "upper bound" in measured.eta["tokens_source"]


def test_eta_counts_rows_of_the_training_file(gpu_settings):
    r = sizing.size_report(gpu_settings(), gpu="rtx4090")
    assert r.eta["rows"] > 0 and r.eta["rows_source"] == "line count of the training files"
    assert r.eta["seconds"] > 0
    assert sizing.size_report(gpu_settings(), gpu="24GiB").eta.get("why")  # an amount has no FLOP/s figure


def test_flops_per_token_by_hand_for_qwen25_7b():
    shape = sizing.PRESETS["qwen2.5-7b"]
    layers = L * sum(a * b for a, b in LINEARS.values())  # the decoder's matmul weights
    assert layers == 6_525_288_448
    head = V * H  # the untied LM head: 544,997,376
    attn = 2 * L * (HEADS * D) * 2048  # causal: 2 x 2 x q_dim x 2048/2 per layer and token
    lora = 40_370_176
    # frozen base: forward 2, backward (input gradients only) 2; LoRA 6; attention forward 1 + backward 2
    model = 4 * (layers + head) + 3 * attn + 6 * lora
    assert sizing.model_flops_per_token(shape, 2048, lora) == model
    assert sizing.flops_per_token(shape, 2048, gradient_checkpointing=False, lora_params=lora) == model
    # checkpointing recomputes the decoder layers' forward (not the LM head's)
    executed = model + 2 * layers + attn + 2 * lora
    assert sizing.flops_per_token(shape, 2048, gradient_checkpointing=True, lora_params=lora) == executed
    assert attn == 411_041_792
    assert model == 29_756_489_728  # ~29.8 GFLOP per token
    # MFU: model FLOPs x tokens/s over the dense peak
    assert sizing.mfu(shape, 2048, 1000.0, 989.4, lora) == pytest.approx(model * 1000 / 989.4e12)


def test_probe_needs_cuda(gpu_settings, monkeypatch):
    monkeypatch.setattr("ft.manifest.cuda_available", lambda: False)
    with pytest.raises(FtError, match="needs a CUDA GPU"):
        sizing.probe(gpu_settings())


# -- the benchmark's CPU-checkable part -------------------------------------------------------------
def test_bench_dry_run_writes_the_prediction_tables(tmp_path):
    t = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_gpu.py"),
            "--dry-run",
            "--out",
            str(tmp_path),
            "--gpu",
            "h100",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    print(f"\nbench --dry-run took {time.perf_counter() - t:.2f} s")
    data = json.loads((tmp_path / "sizing-predicted.json").read_text())
    rows = data["rows"]
    assert {r["model"] for r in rows} == {"qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"}
    assert {(r["micro_batch"], r["seq_len"]) for r in rows} == {(1, 4096), (4, 2048), (8, 1024), (16, 2048)}
    assert {r["backend"] for r in rows} == {"unsloth", "hf"}
    assert all(r["measured_peak_gib"] is None for r in rows)  # nothing measured in a dry run
    md = (tmp_path / "sizing-predicted.md").read_text()
    assert "not measured" in md and "qwen2.5-7b" in md
    for preset in ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"):
        cfg = json.loads((tmp_path / "models" / preset / "config.json").read_text())
        assert sizing.shape_from_config(cfg, preset) == sizing.PRESETS[preset]


# -- the command line ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "starts"),
    [
        (["--gpu", "voodoo2"], "error: --gpu voodoo2: unknown GPU"),
        (["--gpu", "rtx4900"], "error: --gpu rtx4900: unknown GPU; did you mean 'rtx4090'?"),
        (["--gpu", "24"], "error: --gpu 24: unknown GPU"),  # a bare number is not an amount
        (["--gpu", "0GiB"], "error: --gpu 0GiB: memory must be positive"),
        (["--micro-batch", "0"], "error: --micro-batch 0: must be at least 1"),
        (["--seq", "0"], "error: --seq 0: must be at least 1"),
        (["--model", "./no-such-model"], "error: model.name_or_path: ./no-such-model: no such directory"),
        (["--probe"], "error: ft size --probe needs a CUDA GPU"),
    ],
)
def test_cli_errors_are_one_line_exit_2(argv, starts, capsys, monkeypatch):
    from ft.cli import main

    monkeypatch.setattr("ft.manifest.cuda_available", lambda: False)
    assert main(["size", "--recipe", "tiny", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(starts), captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.out == ""


def test_cli_sizes_a_local_7b_config_against_a_named_gpu(tmp_path, capsys, monkeypatch):
    from ft.cli import main

    monkeypatch.setattr("ft.sizing.gpus.detect", lambda: None)
    d = tmp_path / "qwen7b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(sizing.PRESETS["qwen2.5-7b"].to_config()))
    args = ["size", "--model", str(d), "--set", "train.backend=unsloth", "--gpu", "rtx4090", "--seq", "2048"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backend"] == "unsloth" and report["gpu"]["name"] == "rtx4090"
    assert report["estimate"]["inputs"]["seq_len"] == 2048
    assert report["estimate"]["params"]["total"] == 7_615_616_512
    assert report["max_micro_batch"] * report["grad_accum"] == report["effective_batch"]
    assert report["micro_batch"] == report["max_micro_batch"]  # `auto`: predicted at the largest fit
    assert report["fits"] is True and report["headroom_bytes"] > 0
    assert report["eta"]["seconds"] > 0
    assert main([*args, "--micro-batch", "2"]) == 0
    text = capsys.readouterr().out
    assert "micro-batch 2 x 2048 tokens" in text and "GPU rtx4090: 24.0 GiB ->" in text
    assert "largest micro-batch that fits" in text and "gradient accumulation" in text


def test_cli_lists_the_built_in_shapes(capsys):
    from ft.cli import build_parser, main

    assert main(["size", "--list-models"]) == 0
    out = capsys.readouterr().out
    for name, shape in sizing.PRESETS.items():
        line = next(x for x in out.splitlines() if x.split()[:1] == [name])
        assert f"{shape.total_params() / 1e9:.2f} B" in line
    assert main(["size", "--list-models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listed] == list(sizing.PRESETS)
    assert listed[0]["config"]["hidden_size"] == sizing.PRESETS[listed[0]["name"]].hidden
    help_text = build_parser()._subparsers._group_actions[0].choices["size"].format_help()
    assert "--list-models" in help_text


def test_size_report_uses_the_backend_it_is_given(gpu_settings):
    r = sizing.size_report(gpu_settings(**{"train.backend": "auto"}), gpu="h100", backend=("unsloth", "test"))
    assert (r.backend, r.backend_reason) == ("unsloth", "test")
    assert r.estimate.inputs["backend"] == "unsloth"


# -- the benchmark's CPU-side parts ---------------------------------------------------------------------
def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_plan_and_argument_checks(capsys):
    bench = _bench()
    assert bench._points("1x4096, 4x2048") == [(1, 4096), (4, 2048)]
    assert bench._throughput("qwen2.5-7b:2x2048") == [("qwen2.5-7b", 2, 2048)]
    for bad in ("4", "0x2048", "ax2"):
        with pytest.raises(ValueError):
            bench._points(bad)
    with pytest.raises(ValueError, match="unknown shape"):
        bench._throughput("gpt5:1x1")
    bench.main(["--list"])
    ids = capsys.readouterr().out.split()
    # the throughput point: Unsloth, plain hf, a bare Unsloth loop; then the sizing sweep
    assert ids[:3] == [
        "throughput-ft-unsloth-qwen2.5-7b-2x2048",
        "throughput-ft-hf-qwen2.5-7b-2x2048",
        "throughput-bare-unsloth-qwen2.5-7b-2x2048",
    ]
    assert len(ids) == 3 + 3 * 4 * 2 and len(set(ids)) == len(ids)
    bench.main(["--list", "--only", "0.5b"])
    assert all("qwen2.5-0.5b" in i for i in capsys.readouterr().out.split())
    for argv in (["--gpu", "voodoo2"], ["--models", "gpt5"], ["--sweep-points", "4"], ["--throughput", "x"]):
        with pytest.raises(SystemExit) as info:
            bench.main([*argv, "--list"])
        assert info.value.code == 2


def test_bench_tables_from_synthetic_results(tmp_path):
    """The report arithmetic on made-up records (never reported anywhere): speed-up, memory ratio,
    overhead, MFU and the prediction error, in JSON and Markdown."""
    bench = _bench()
    args = bench.main.__globals__["argparse"].Namespace(
        out=str(tmp_path),
        models="qwen2.5-0.5b",
        sweep_points="1x4096",
        throughput="qwen2.5-7b:2x2048",
        warmup=3,
        steps=6,
        sweep_warmup=1,
        sweep_steps=2,
        only=None,
    )
    specs = bench.plan(args)
    device = {"device": "NVIDIA H100 80GB HBM3", "device_memory_bytes": 80 * GIB, "cuda": "13.0"}
    fake = {  # tokens/s and peak bytes, synthetic
        "throughput-ft-unsloth-qwen2.5-7b-2x2048": (4000.0, 6 * GIB),
        "throughput-ft-hf-qwen2.5-7b-2x2048": (2000.0, 12 * GIB),
        "throughput-bare-unsloth-qwen2.5-7b-2x2048": (4100.0, 6 * GIB),
        "sweep-ft-unsloth-qwen2.5-0.5b-1x4096": (None, 2 * GIB),
        "sweep-ft-hf-qwen2.5-0.5b-1x4096": (None, None),
    }
    results = []
    for spec in specs:
        tps, peak = fake[spec["id"]]
        record = {"spec": spec, **device, "versions": {"torch": "x"}, "started": "synthetic"}
        if peak:
            record.update(peak_allocated_bytes=peak, tokens_per_s=tps)
        else:
            record.update(error="OutOfMemoryError: synthetic", oom=True)
        results.append(record)
    (tmp_path / "runs").mkdir()
    for record in results[1:]:  # results gathered from several machines: the report is rebuilt from files
        (tmp_path / "runs" / f"{record['spec']['id']}.json").write_text(json.dumps(record))
    assert [r["spec"]["id"] for r in bench.collect(args)] == [r["spec"]["id"] for r in results[1:]]
    bench.write_reports(args, results)
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["path"]: r for r in data["throughput"]}
    shape = sizing.PRESETS["qwen2.5-7b"]
    lora = sizing.estimate(shape).params["lora"]  # r=16 on all seven projections
    assert rows["ft-unsloth"]["flop_utilisation"] == pytest.approx(
        sizing.model_flops_per_token(shape, 2048, lora) * 4000.0 / 989.4e12
    )
    predicted = sizing.estimate(
        shape, seq_len=2048, micro_batch=2, backend="unsloth", gpu_memory_bytes=80 * GIB
    )
    assert rows["ft-unsloth"]["predicted_peak_bytes"] == predicted.peak_allocated_bytes
    assert rows["ft-unsloth"]["error"] == pytest.approx(
        (predicted.peak_allocated_bytes - 6 * GIB) / (6 * GIB)
    )
    md = (tmp_path / "bench.md").read_text()
    assert "**2.00×** tokens/s (target ≥ 1.9×: met)" in md
    assert "**0.50×** peak memory (target ≤ 0.65×: met)" in md
    assert "overhead over a bare Unsloth loop: **+2.4%** (target < 3%: met)" in md
    sweep = {r["backend"]: r for r in data["sizing"]}
    assert sweep["unsloth"]["measured_peak_gib"] == 2.0 and sweep["hf"]["oom"] is True
    assert "| qwen2.5-0.5b | 1 × 4096 | hf |" in md and "| OOM |" in md


# -- calibration against issue 8's H100 figures ---------------------------------------------------------
# Independent H100 measurements (issue 8, item 6; unsloth 2026.10.5, trl 1.14.2, transformers 5.17.0, peft
# 0.21, bitsandbytes 0.50.2; random-weight shapes, LoRA r16/alpha 32 on all seven projections, adamw_8bit,
# gradient checkpointing, fixed-length rows) were given as errors of ft size's predictions, not as
# absolute peaks. The measured peaks below are inferred from them: the prediction ft size made at commit
# ee08e31 (GiB, column `then`) divided by (1 + the stated error). Unsloth: "within +-3%" for the 7B, 14B,
# Llama-8B and 1.5B shapes (taken as 0; the points are this table's choice); hf: "+11% to +16%" for 1.5B
# 16x2048 and 4x2048 and 7B 8x1024 (taken as +13.5%), "within 2%" for 14B 1x2048 and 0.5B 4x1024 (0);
# both backends "30-50%" over at 0.5B 4x512 (+40%).
H100 = [  # backend, shape, micro-batch, seq, then (GiB), stated error
    ("unsloth", "qwen2.5-7b", 2, 2048, 6.518, 0.0),
    ("unsloth", "qwen2.5-7b", 8, 1024, 7.335, 0.0),
    ("unsloth", "qwen2.5-14b", 1, 2048, 10.753, 0.0),
    ("unsloth", "llama-3.1-8b", 2, 2048, 6.610, 0.0),
    ("unsloth", "qwen2.5-1.5b", 4, 2048, 2.033, 0.0),
    ("unsloth", "qwen2.5-1.5b", 16, 2048, 4.250, 0.0),
    ("unsloth", "qwen2.5-0.5b", 4, 512, 1.148, 0.40),
    ("hf", "qwen2.5-1.5b", 16, 2048, 17.035, 0.135),
    ("hf", "qwen2.5-1.5b", 4, 2048, 5.556, 0.135),
    ("hf", "qwen2.5-7b", 8, 1024, 16.196, 0.135),
    ("hf", "qwen2.5-14b", 1, 2048, 16.850, 0.0),
    ("hf", "qwen2.5-0.5b", 4, 1024, 1.998, 0.0),
    pytest.param(
        "hf",
        "qwen2.5-0.5b",
        4,
        512,
        1.812,
        0.40,
        marks=pytest.mark.xfail(
            strict=True,
            reason="not reconciled: with 0.5B 4x1024 within 2%, this point needs ~0.6 GiB (~300 KB per "
            "token) more transient memory at 4x1024 than at 4x512, more than the whole per-token "
            "activation the hf code paths explain at 0.5B; needs the measured grid (gpu_check.py)",
        ),
    ),
]


@pytest.mark.parametrize(("backend", "model", "micro", "seq", "then", "error"), H100)
def test_predictions_within_ten_percent_of_the_h100_figures(backend, model, micro, seq, then, error):
    measured = then / (1 + error) * GIB
    e = sizing.estimate(
        model,
        seq_len=seq,
        micro_batch=micro,
        backend=backend,
        optimizer="adamw_8bit",
        gpu_memory_bytes=80 * GIB,
    )
    assert e.inputs["loss"] == ("unsloth_fused" if backend == "unsloth" else "chunked_nll")
    err = e.peak_allocated_bytes / measured - 1
    assert abs(err) <= 0.10, f"{err:+.1%}"
    if backend == "unsloth" and error == 0.0:
        assert abs(err) <= 0.03, f"{err:+.1%}"  # the Unsloth figures were within 3%: kept


def test_trl_still_casts_quantised_lora_weights_to_bf16():
    """The hf backend's bf16 LoRA terms rest on this line of TRL's SFTTrainer (read without importing trl)."""
    import importlib.util

    spec = importlib.util.find_spec("trl")
    if spec is None:
        pytest.skip("trl not installed")
    text = (Path(spec.origin).parent / "trainer" / "sft_trainer.py").read_text()
    cast = text.index("param.data = param.data.to(torch.bfloat16)")
    assert "if _is_quantized_model:" in text[cast - 300 : cast]


def test_size_report_uses_unsloth_s_fused_loss(gpu_settings):
    r = sizing.size_report(gpu_settings("qwen2.5-7b", **{"train.backend": "unsloth"}), gpu="h100")
    assert r.estimate.inputs["loss"] == "unsloth_fused" and "loss unsloth_fused" in r.render()
    hf = sizing.size_report(gpu_settings("qwen2.5-7b", **{"train.backend": "hf"}), gpu="h100")
    assert hf.estimate.inputs["loss"] == "chunked_nll"


# -- eval ---------------------------------------------------------------------------------------------
def test_eval_phases_by_hand_7b():
    B, P, N = 8, 1024, 128
    ph = sizing.eval_phases("qwen2.5-7b", B, prompt_tokens=P, new_tokens=N, loss_tokens=2048)
    gen, loss = ph["generation"], ph["loss"]
    assert gen["KV cache (prompt + new tokens)"] == 2 * L * KVD * (P + N) * B * 2
    assert gen["last-position logits (16-bit, fp32 copy, scores)"] == B * V * (2 + 4 + 4)
    layer = 2 * (3 * H + H + 2 * KVD + H) + 3 * 2 * FF
    assert gen["prefill: one layer's activations"] == layer * B * P
    assert gen["dequantised weight (transient)"] == 2 * H * FF
    assert loss["logits chunk (16-bit, then fp32)"] == (256 << 20) + 2 * V * ((256 << 20) // (4 * V))
    # the loss phase at 8 x 2048 is a fraction of the batch x tokens x vocab fp32 logits eval used to build
    full = 8 * 2048 * V * 4
    assert (
        sum(
            sizing.eval_phases("qwen2.5-7b", 8, prompt_tokens=P, new_tokens=N, loss_tokens=2048)[
                "loss"
            ].values()
        )
        < full / 3
    )


def test_eval_batch_that_fits_steps_down_with_free_memory():
    kw = {"prompt_tokens": 1024, "new_tokens": 128}
    need = {b: sizing.eval_transient_bytes("qwen2.5-7b", b, **kw) for b in (1, 4, 8)}
    assert need[1] < need[4] < need[8]

    def room(b):
        return int(need[b] * (1 + sizing.ALLOCATOR_RESERVE_FRACTION) / (1 - sizing.FIT_SAFETY_FRACTION)) + 1

    assert sizing.eval_batch_that_fits("qwen2.5-7b", room(8), 8, **kw) == 8
    assert sizing.eval_batch_that_fits("qwen2.5-7b", room(4), 8, **kw) == 4
    assert sizing.eval_batch_that_fits("qwen2.5-7b", 1000, 8, **kw) == 1  # never below 1: OOM steps then


def test_size_report_shows_eval(gpu_settings):
    s = gpu_settings(
        "qwen2.5-7b", **{"train.backend": "hf", "eval.batch_size": 64, "eval.max_new_tokens": 512}
    )
    small = sizing.size_report(s, gpu="rtx4090").eval
    big = sizing.size_report(s, gpu="h100").eval
    assert small["batch_size"] == big["batch_size"] == 64
    assert small["batch_that_fits"] < big["batch_that_fits"] <= 64
    assert small["peak_allocated_bytes"] == small["persistent_bytes"] + small["phases"][small["phase"]]
    text = sizing.size_report(s, gpu="rtx4090").render()
    assert "eval: batch 64 x (2048 prompt + 512 new tokens)" in text and "largest that fits" in text
