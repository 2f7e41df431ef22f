"""ft size --nproc: per-rank memory under DDP and FSDP, the wall time with N GPUs, the one-GPU verdict."""

from __future__ import annotations

import json

import pytest

from ft import sizing
from ft.cli import main
from ft.config import load_settings
from ft.errors import FtError
from ft.sizing import ranks

MODEL = "qwen2.5-7b"


def report(nproc, distributed="ddp", gpu="h100", nodes=1, **kw):
    settings = load_settings("default", {"model": {"name_or_path": MODEL}})
    return sizing.size_report(
        settings, gpu=gpu, nproc=nproc, nodes=nodes, distributed=distributed, micro_batch=1, **kw
    ).ranks


def sharded_bytes(r):
    return sum(v for k, v in r.rank.breakdown.items() if "(1/" in k)


def test_fsdp_shards_fall_with_n_and_the_rest_stays():
    by_n = {n: report(n, "fsdp") for n in (2, 4, 8)}
    shards = {n: sharded_bytes(r) for n, r in by_n.items()}
    # 1/N of the same terms (ceil per term: within a few bytes)
    assert shards[2] / shards[4] == pytest.approx(2, rel=1e-6)
    assert shards[4] / shards[8] == pytest.approx(2, rel=1e-6)
    totals = [by_n[n].rank.total_bytes for n in (2, 4, 8)]
    assert totals[0] > totals[1] > totals[2]
    for r in by_n.values():  # per rank, not sharded: activations, NF4 constants; transient full layers
        b = r.rank.breakdown
        assert b["nf4 quantisation constants"] == by_n[2].rank.breakdown["nf4 quantisation constants"]
        assert b["checkpointed layer inputs"] == by_n[2].rank.breakdown["checkpointed layer inputs"]
        assert any(k.startswith("FSDP: 2 decoder layers all-gathered") for k in b)


def test_fsdp_gathers_two_layers_and_the_root():
    r = report(4, "fsdp")
    settings = load_settings("default", {"model": {"name_or_path": MODEL}})
    est = sizing.size_report(settings, gpu="h100", micro_batch=1).estimate  # the same terms, one GPU
    b, src = r.rank.breakdown, est.breakdown
    layer_base = src["base linear weights (nf4)"] + src["norms + biases"]
    layer = (layer_base + src["lora weights (bf16)"]) // 28  # Qwen2.5-7B: 28 decoder layers
    assert b["FSDP: 2 decoder layers all-gathered (transient)"] == 2 * layer
    assert b["FSDP: root unit all-gathered (embeddings, LM head)"] == src["embeddings"] + src["lm head"]


def test_ddp_stays_flat_with_n():
    totals = {n: report(n, "ddp").rank.total_bytes for n in (2, 4, 8)}
    assert len(set(totals.values())) == 1
    r = report(2, "ddp")
    single = sizing.size_report(
        load_settings("default", {"model": {"name_or_path": MODEL}}), gpu="h100", micro_batch=1
    )
    extra = r.rank.total_bytes - single.estimate.total_bytes
    buckets = r.rank.breakdown["DDP gradient buckets (a copy of the LoRA gradients)"]
    nccl = ranks.NCCL_BUFFER_BYTES
    # DDP = the one-GPU terms + its buckets + NCCL, with the allocator reserve on the larger peak
    assert extra == pytest.approx(buckets + nccl + buckets * 0.08, abs=4)


def test_eta_scales_by_n_times_the_stated_efficiency():
    for dist, link in (("ddp", "nvlink"), ("fsdp", "network")):
        nodes = 2 if link == "network" else 1
        r = report(4, dist, nodes=nodes)
        eff = ranks.SCALING_EFFICIENCY[(dist, link)]
        world = 4 * nodes
        assert r.interconnect == link and r.efficiency == eff
        assert r.eta["seconds"] == pytest.approx(r.eta["single_gpu_seconds"] / (world * eff))
        assert f"x {eff:.2f}" in r.eta["assumption"]
    r = report(2, "ddp", interconnect="pcie")
    assert r.efficiency == ranks.SCALING_EFFICIENCY[("ddp", "pcie")]


def test_one_gpu_suffices_line():
    assert report(2, "ddp", gpu="h100").verdict() == "one GPU fits this: 2 GPUs only save time"
    # 14 B on a 16 GiB card: one GPU does not fit; DDP cannot help, FSDP over 8 can
    settings = load_settings("default", {"model": {"name_or_path": "qwen2.5-14b"}})
    ddp = sizing.size_report(settings, gpu="16GiB", nproc=8, distributed="ddp", micro_batch=1).ranks
    fsdp = sizing.size_report(settings, gpu="16GiB", nproc=8, distributed="fsdp", micro_batch=1).ranks
    assert ddp.one_gpu_fits is False and ddp.fits is False
    assert "DDP replicates the model" in ddp.verdict() and "--distributed fsdp" in ddp.verdict()
    assert fsdp.fits is True
    assert fsdp.verdict() == "one GPU does not fit this; 8 GPUs with fsdp do"


def test_cli_json_has_the_per_rank_fields(capsys):
    argv = ["size", "--model", MODEL, "--gpu", "h100", "--nproc", "4", "--distributed", "fsdp", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)["ranks"]
    for key in (
        "distributed",
        "world_size",
        "nproc_per_node",
        "nodes",
        "micro_batch_per_rank",
        "grad_accum",
        "per_rank_breakdown",
        "per_rank_peak_allocated_bytes",
        "per_rank_total_bytes",
        "single_gpu_total_bytes",
        "one_gpu_fits",
        "fits_per_rank",
        "verdict",
        "eta",
        "scaling_efficiency",
    ):
        assert key in out, key
    assert out["world_size"] == 4 and out["distributed"] == "fsdp"
    assert out["micro_batch_per_rank"] * out["grad_accum"] * 4 == 16  # the default effective batch
    assert main(["size", "--model", MODEL, "--gpu", "h100"]) == 0
    assert "per rank" not in capsys.readouterr().out  # no --nproc: the single-GPU report as before


def test_text_report_and_errors(capsys):
    assert main(["size", "--model", MODEL, "--gpu", "h100", "--nproc", "2"]) == 0
    out = capsys.readouterr().out
    assert "per rank: 2 processes" in out and "one GPU fits this: 2 GPUs only save time" in out
    assert f"{ranks.SCALING_EFFICIENCY[('ddp', 'nvlink')]:.2f}" in out
    assert main(["size", "--model", MODEL, "--nproc", "3"]) == 2  # 16 does not split over 3 ranks
    assert "multiple of 3" in capsys.readouterr().err
    assert main(["size", "--model", MODEL, "--distributed", "fsdp"]) == 2
    assert "add --nproc" in capsys.readouterr().err
    settings = load_settings("default", {"model": {"name_or_path": MODEL}, "train": {"backend": "unsloth"}})
    with pytest.raises(FtError, match="unsloth runs on one GPU"):
        sizing.size_report(settings, gpu="h100", nproc=2)


def test_auto_backend_is_hf_with_several_processes(monkeypatch):
    monkeypatch.setattr(sizing, "resolve_backend", lambda *a: ("unsloth", "auto: a supported architecture"))
    settings = load_settings("default", {"model": {"name_or_path": MODEL}})
    rep = sizing.size_report(settings, gpu="h100", nproc=2)
    assert rep.backend == "hf" and "single-GPU" in rep.backend_reason
    assert sizing.size_report(settings, gpu="h100").backend == "unsloth"


def test_recipe_distributed_is_the_default():
    settings = load_settings("default", {"model": {"name_or_path": MODEL}, "train": {"distributed": "fsdp"}})
    assert sizing.size_report(settings, gpu="h100", nproc=2).ranks.distributed == "fsdp"
