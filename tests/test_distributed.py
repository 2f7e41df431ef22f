"""Several processes under torchrun, for real: two CPU processes on the gloo backend, the tiny model.

`python -m torch.distributed.run --nproc-per-node 2 -m ft ...` is what a user types (torchrun is that
module's script); the launcher sets RANK/WORLD_SIZE/MASTER_ADDR and ft takes its process group from there.

(a) Equivalence: 2 ranks x micro-batch 4 give the loss curve of 1 process x micro-batch 8 (the same
    effective batch of 8). Each optimizer step sees the same 8 rows (one seeded order; Accelerate hands
    rank r micro-batches r, r+2, ...), and transformers normalises the loss by the token count summed
    over the ranks (average_tokens_across_devices), so the gradients are equal but for the order of the
    fp32 sums (half the tokens summed on each rank, then all-reduced). That reordering moves a loss by a
    few ulps (~1e-7 relative; measured: < 2e-7 on this machine); RTOL = 1e-5 leaves room for other CPUs'
    kernels while a real difference -- a wrong loss normalisation (x2), another data order or a missing
    gradient all-reduce -- moves the losses by 1e-2 or more.
(b) `kill -9` of rank 1 in the middle of step 5 (FT_TEST_KILL_AT with FT_TEST_KILL_RANK), then
    `--resume auto` under torchrun again: the adapter's sha256 equals the uninterrupted 2-process run's.
(c) `ft run` under torchrun: rank 0 alone writes metrics, evaluates and packages: every step once in
    metrics.jsonl, one bundle, and env.json (and the bundle's README) names the node and its ranks.

FSDP cannot run on CPU processes (Accelerate shards on accelerators only and would quietly train plain
DDP), so it is refused there; its TrainingArguments and FSDP-QLoRA loading are checked here, and it runs
for real only in the GPU test at the end (two or more GPUs).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ft.errors import FtError

RTOL = 1e-5
STEPS = 6
COMMON = [
    "--recipe",
    "tiny",
    "--set",
    f"train.max_steps={STEPS}",
    "--set",
    "train.save_every=3",
    "--set",
    "eval.max_examples=8",  # (c) needs an evaluation, not a long one
]


# -- helpers ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FT_TEST_")}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", **extra}


def _ft(work: Path, args: list[str], *, nproc: int = 1, **env: str) -> subprocess.CompletedProcess:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
        + ["--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "ft"]
        if nproc > 1
        else [sys.executable, "-m", "ft"]
    )
    return subprocess.run(
        launcher + args, cwd=work, env=_env(**env), capture_output=True, text=True, timeout=900
    )


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _compose_multi_gpu_command() -> list[str]:
    """compose.yaml's `train-gpus` entrypoint as its shell gets it (Compose turns `$$` into `$`)."""
    import yaml

    service = yaml.safe_load((Path(__file__).parent.parent / "compose.yaml").read_text())["services"][
        "train-gpus"
    ]
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "all"
    assert "FT_NPROC" in service["environment"]
    return [part.replace("$$", "$") for part in service["entrypoint"]]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_model_dir):
    """`ft run` with 2 ranks x micro-batch 4, started by compose.yaml's multi-GPU command with FT_NPROC=2
    (torchrun; on this CPU machine the ranks use gloo): the reference for (a), (b) and (c)."""
    work = tmp_path_factory.mktemp("ddp")
    args = ["--recipe", *COMMON[1:], "--set", "train.micro_batch=4", "--set", "output.run_name=two"]
    env = _env(
        FT_NPROC="2",
        PET_MASTER_PORT=str(_free_port()),  # torchrun reads its flags from PET_* too
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    proc = subprocess.run(
        _compose_multi_gpu_command() + args, cwd=work, env=env, capture_output=True, text=True, timeout=900
    )
    _ok(proc)
    return work, work / "runs" / "two", proc


# -- (a) ----------------------------------------------------------------------------------------------
def test_two_ranks_give_the_loss_curve_of_one_process_with_the_same_effective_batch(two_process_run):
    work, two, _ = two_process_run
    _ok(_ft(work, ["train", *COMMON, "--set", "train.micro_batch=8", "--set", "output.run_name=one"]))
    one = work / "runs" / "one"
    curve = {r["step"]: r for r in _rows(one) if r.get("kind") == "train"}
    curve2 = {r["step"]: r for r in _rows(two) if r.get("kind") == "train"}
    assert sorted(curve) == sorted(curve2) == list(range(1, STEPS + 1))
    for step in curve:
        for key in ("loss", "grad_norm"):
            assert curve2[step][key] == pytest.approx(curve[step][key], rel=RTOL), (step, key)
        assert curve2[step]["tokens_seen"] == curve[step]["tokens_seen"]  # the same rows, both ranks counted
    meta = json.loads((two / "run.json").read_text())
    assert meta["train"]["micro_batch"] == 4 and meta["train"]["grad_accum"] == 1
    dist = json.loads((two / "env.json").read_text())["distributed"]
    assert dist["world_size"] == 2 and dist["mode"] == "ddp" and dist["effective_batch"] == 8
    assert "seeded order" in dist["data_order"]


# -- (b) ----------------------------------------------------------------------------------------------
def test_kill_9_of_one_rank_then_resume_auto_gives_the_uninterrupted_adapter(two_process_run):
    work, two, _ = two_process_run
    args = ["train", *COMMON, "--set", "train.micro_batch=4", "--set", "output.run_name=killed"]
    killed = _ft(work, args, nproc=2, FT_TEST_KILL_AT="step:5:mid", FT_TEST_KILL_RANK="1")
    assert killed.returncode != 0
    run = work / "runs" / "killed"
    from ft.train import list_checkpoints, read_marker

    [checkpoint] = list_checkpoints(run)  # step 3; step 6 was never reached
    assert read_marker(checkpoint)["world_size"] == 2
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}
    assert not (run / "adapter").exists()

    resumed = _ft(work, [*args, "--resume", "auto"], nproc=2)
    _ok(resumed)
    assert "resuming run killed from step 3 of 6" in resumed.stdout
    assert _sha(run / "adapter" / "adapter_model.safetensors") == _sha(
        two / "adapter" / "adapter_model.safetensors"
    )
    steps = [r["step"] for r in _rows(run) if r.get("kind") == "train"]
    assert steps == list(range(1, STEPS + 1))

    # The checkpoint belongs to 2 processes: one process may not silently go on from it.
    from ft.train import check_resume_compatible

    with pytest.raises(FtError, match=r"processes changed \(2 -> 1\)"):
        check_resume_compatible(read_marker(checkpoint), read_marker(checkpoint)["recipe"], "x", force=False)


# -- (c) ----------------------------------------------------------------------------------------------
def test_rank_0_alone_writes_metrics_reports_and_the_bundle(two_process_run):
    work, two, proc = two_process_run
    lines = (two / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines))
    assert [r["step"] for r in map(json.loads, lines) if r.get("kind") == "train"] == list(
        range(1, STEPS + 1)
    )
    assert proc.stdout.count("run directory:") == 1 and proc.stdout.count("bundle   ") == 1
    bundles = sorted(p.name for p in (work / "bundles").iterdir())
    assert bundles == ["two", "two.manifest.sha256", "two.tar.gz"]
    meta = json.loads((two / "run.json").read_text())
    assert meta["status"] == "complete"
    nodes = json.loads((two / "env.json").read_text())["distributed"]["nodes"]
    assert len(nodes) == 1 and nodes[0]["ranks"] == [0, 1] and nodes[0]["hostname"] == socket.gethostname()
    readme = (work / "bundles" / "two" / "README.md").read_text()
    assert f"{nodes[0]['hostname']}: ranks [0, 1]" in readme


# -- choices made without processes -------------------------------------------------------------------
@pytest.fixture
def two_ranks(monkeypatch):
    """This process as rank `r` of 2, as torchrun would set it (no process group is opened)."""

    def as_rank(r: int = 0):
        for name, value in {
            "WORLD_SIZE": "2",
            "RANK": str(r),
            "LOCAL_RANK": str(r),
            "LOCAL_WORLD_SIZE": "2",
        }.items():
            monkeypatch.setenv(name, value)

    return as_rank


def test_several_processes_choose_hf_and_refuse_unsloth(tiny_settings, two_ranks):
    from ft import backends

    two_ranks()
    auto = tiny_settings(**{"train.backend": "auto", "train.device": "auto"})
    assert backends.choose(auto, "cuda", "qwen2") == (
        "hf",
        "auto: 2 processes (torchrun/accelerate launch); Unsloth trains on one GPU only",
    )
    with pytest.raises(FtError, match="unsloth trains on one GPU only, but this run has 2 processes"):
        backends.choose(
            tiny_settings(**{"train.backend": "unsloth", "train.device": "auto"}), "cuda", "qwen2"
        )


def test_none_under_a_launcher_means_ddp_and_one_process_is_never_wrapped(tiny_settings, two_ranks):
    from ft.train import distributed

    s = tiny_settings()
    assert distributed.mode(s) == "none" and distributed.trainer_args(s) == {}
    two_ranks(1)
    assert distributed.mode(s) == "ddp" and not distributed.is_main() and distributed.local_rank() == 1
    assert distributed.trainer_args(s) == {"ddp_find_unused_parameters": False}


def test_fsdp_is_refused_on_cpu(tiny_settings, two_ranks):
    from ft.train import distributed

    with pytest.raises(Exception, match="fsdp needs CUDA GPUs, but train.device is cpu"):
        tiny_settings(**{"train.distributed": "fsdp"})
    two_ranks()
    s = tiny_settings(**{"train.distributed": "fsdp", "train.device": "auto"})
    with pytest.raises(FtError, match="fsdp needs CUDA GPUs, but this run trains on cpu"):
        distributed.check(s, "cpu")
    distributed.check(s, "cuda")


def test_fsdp_trainer_arguments_reach_accelerates_fsdp2_plugin(
    tiny_settings, two_ranks, monkeypatch, tmp_path
):
    """ft's fsdp arguments as transformers' TrainingArguments turns them into Accelerate's FSDP plugin."""
    from transformers import TrainingArguments

    from ft.train import distributed

    two_ranks()
    args = distributed.trainer_args(tiny_settings(**{"train.distributed": "fsdp", "train.device": "auto"}))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name)  # build the arguments without opening a process group
    plugin = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **args).fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert plugin["state_dict_type"] == "FULL_STATE_DICT" and plugin["reshard_after_forward"] is True


@pytest.mark.parametrize("mode, rank", [("ddp", 1), ("fsdp", 1)])
def test_each_rank_loads_the_4bit_base_onto_its_own_gpu_and_fsdp_stores_it_in_the_compute_dtype(
    tiny_settings, two_ranks, monkeypatch, mode, rank
):
    """hf._load_base's from_pretrained call under a launcher, against transformers' real BitsAndBytesConfig."""
    import torch
    import transformers

    from ft.backends import hf

    two_ranks(rank)
    seen = {}

    class Stop(Exception):
        pass

    def from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    s = tiny_settings(
        **{
            "train.device": "auto",
            "train.distributed": mode,
            "model.quantization": "nf4",
            "model.dtype": "bfloat16",
        }
    )
    with pytest.raises(Stop):
        hf._load_base(s, "cuda")
    q = seen["quantization_config"]
    assert q.bnb_4bit_compute_dtype is torch.bfloat16
    if mode == "ddp":
        assert seen["device_map"] == {"": rank}
        assert q.bnb_4bit_quant_storage is torch.uint8  # bitsandbytes' default
    else:
        assert "device_map" not in seen  # FSDP places and shards the weights
        assert q.bnb_4bit_quant_storage is torch.bfloat16


# -- GPU ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gpus_train_the_default_path_under_torchrun(tmp_path, tiny_model_dir, mode):
    """QLoRA on two GPUs (NCCL): DDP, and FSDP-QLoRA with the 4-bit storage in the compute dtype."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    args = [
        "train",
        "--recipe",
        "tiny",
        "--set",
        "train.device=cuda",
        "--set",
        "model.quantization=nf4",
        "--set",
        "model.dtype=bfloat16",
        "--set",
        f"train.distributed={mode}",
        "--set",
        "train.max_steps=4",
        "--set",
        "train.micro_batch=4",
        "--set",
        f"output.run_name={mode}",
    ]
    _ok(_ft(tmp_path, args, nproc=2))
    run = tmp_path / "runs" / mode
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "env.json").read_text())["distributed"]["mode"] == mode


def _build_in_rank(rank: int, cache: str, port: int) -> None:
    import torch.distributed as dist

    os.environ["FT_CACHE"] = f"{cache}/rank{rank}"  # each rank builds its own: rank 1 must build, too
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        from ft.testing import ensure_tiny_model

        built = ensure_tiny_model()
        assert any(built.glob("*.safetensors")) and (built / "config.json").is_file(), sorted(built.iterdir())
    finally:
        dist.destroy_process_group()


def test_a_rank_other_than_0_builds_the_whole_tiny_model(tmp_path):
    """transformers' save_pretrained writes weights on rank 0 only; `torchrun ... ft run --recipe tiny` on
    a fresh cache sealed a tokenizer-only folder on rank 1, and every rank then failed."""
    import torch.multiprocessing as mp

    mp.spawn(_build_in_rank, args=(str(tmp_path), _free_port()), nprocs=2, join=True)


def test_ft_eval_under_a_launcher_evaluates_once_on_rank_0(tmp_path, monkeypatch):
    """`torchrun ... -m ft eval RUN` must not evaluate (and write eval/) once per rank."""
    from ft.cli import main

    missing = str(tmp_path / "no-such-run")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["eval", missing]) == 0  # not rank 0: nothing to do, nothing read or written
    monkeypatch.setenv("RANK", "0")
    assert main(["eval", missing]) == 2  # rank 0 does the work (here: says the run is missing)
