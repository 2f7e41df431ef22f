"""Preflight: GPU visibility, driver vs image flavour, free VRAM and disk, on faked machine facts."""

from __future__ import annotations

import os
import stat
from types import SimpleNamespace

import pytest

from ft.errors import FtError
from ft.sizing import preflight
from ft.sizing.preflight import GiB, Gpu

H100_580 = "0, NVIDIA H100 80GB HBM3, 580.65.06, 81559, 80000\n"
RTX4090_550 = (
    "0, NVIDIA GeForce RTX 4090, 550.54.14, 24564, 23000\n1, NVIDIA GeForce RTX 4090, 550.54.14, 24564, 100\n"
)
MIG = "0, NVIDIA A100-SXM4-40GB MIG 1g.5gb, 575.57.08, [N/A], [N/A]\n"


def settings(device="auto", quantization="auto", backend="auto", optimizer="adamw_torch", out="runs"):
    """The slice of a Settings that preflight reads."""
    return SimpleNamespace(
        train=SimpleNamespace(device=device, backend=backend, optimizer=optimizer),
        model=SimpleNamespace(quantization=quantization),
        output=SimpleNamespace(dir=str(out)),
    )


@pytest.fixture(autouse=True)
def _no_machine_env(monkeypatch, tmp_path):
    # Nothing about the test machine leaks in: no image record, no FT_REQUIRE_GPU.
    monkeypatch.setenv("FT_IMAGE_INFO", str(tmp_path / "no-image.json"))
    monkeypatch.delenv("FT_REQUIRE_GPU", raising=False)


def run_check(tmp_path, **kw):
    defaults = dict(
        output_dir=tmp_path, gpus=None, nodes=[], container=True, flavour="cu130", need_disk_bytes=1
    )
    return preflight.check(**{**defaults, **kw})


def titles(problems):
    return [(p.severity, p.title) for p in problems]


# -- parsing ------------------------------------------------------------------------------------------------
def test_parse_nvidia_smi_rows_and_na_fields():
    gpus = preflight.parse_nvidia_smi(RTX4090_550 + MIG.replace("0,", "2,", 1))
    assert [g.index for g in gpus] == [0, 1, 2]
    assert gpus[0] == Gpu(0, "NVIDIA GeForce RTX 4090", "550.54.14", 24564 * 1024**2, 23000 * 1024**2)
    assert gpus[2].total_bytes is None and gpus[2].free_bytes is None and gpus[2].driver == "575.57.08"
    assert preflight.parse_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate\n") == []


@pytest.mark.parametrize(
    ("driver", "flavour"),
    [
        ("580.65.06", "cu130"),
        ("590.10", "cu130"),
        ("580.65.05", "cu128"),
        ("575.51.03", "cu128"),
        ("570.26", "cu128"),
        ("550.54.14", "cu128"),
        ("525.60.13", "cu128"),
        ("525.60.12", None),
        ("470.82", None),
        (None, None),
        ("garbage", None),
    ],
)
def test_flavour_for_driver(driver, flavour):
    assert preflight.flavour_for_driver(driver) == flavour


def test_driver_from_proc(tmp_path):
    f = tmp_path / "version"
    f.write_text(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  575.57.08  Sat May 24 07:21:07 UTC 2025\n"
        "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
    )
    assert preflight.driver_from_proc(f) == "575.57.08"
    f.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build\n")
    assert preflight.driver_from_proc(f) == "580.65.06"
    assert preflight.driver_from_proc(tmp_path / "absent") is None


def test_query_gpus_through_a_fake_nvidia_smi_on_path(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\nprintf '{H100_580.strip()}\\n'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    (gpu,) = preflight.query_gpus()
    assert (
        gpu.name == "NVIDIA H100 80GB HBM3"
        and gpu.driver == "580.65.06"
        and gpu.free_bytes == 80000 * 1024**2
    )


def test_query_gpus_when_nvidia_smi_fails_or_is_missing(monkeypatch):
    def failing(cmd):
        raise OSError("no such file")

    assert preflight.query_gpus(failing) is None
    monkeypatch.setenv("PATH", "")
    assert preflight.query_gpus() is None


# -- GPU visibility -----------------------------------------------------------------------------------------
def test_no_gpu_in_container_names_toolkit_and_smoke(tmp_path):
    (p,) = run_check(tmp_path, require_gpu=True)
    assert p.severity == "error" and "no GPU visible" in p.title
    for must in ("NVIDIA driver", "NVIDIA Container Toolkit", "--gpus all", "docker compose run --rm smoke"):
        assert must in p.advice


def test_no_gpu_on_host_says_install_driver(tmp_path):
    (p,) = run_check(tmp_path, require_gpu=True, container=False)
    assert "Install the NVIDIA driver" in p.advice and "smoke" in p.advice


def test_gpu_needed_is_derived_from_the_recipe(tmp_path):
    assert run_check(tmp_path, settings=settings()) == []  # auto device: the CPU is a valid fallback
    for s in (
        settings(device="cuda"),
        settings(quantization="nf4"),
        settings(backend="unsloth"),
        settings(optimizer="paged_adamw_8bit"),
    ):
        assert titles(run_check(tmp_path, settings=s))[0][0] == "error"


def test_ft_require_gpu_env_makes_a_missing_gpu_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FT_REQUIRE_GPU", "1")
    assert "no GPU visible" in run_check(tmp_path, settings=settings())[0].title


def test_cpu_image_with_a_gpu_recipe(tmp_path):
    (p,) = run_check(tmp_path, require_gpu=True, flavour="cpu")
    assert "CPU build" in p.title and "docker compose build train" in p.advice


def test_device_nodes_without_nvidia_smi_warns(tmp_path):
    (p,) = run_check(tmp_path, require_gpu=True, nodes=["nvidia0"])
    assert p.severity == "warning" and "NVIDIA_DRIVER_CAPABILITIES" in p.advice


def test_a_visible_gpu_with_a_new_driver_passes(tmp_path):
    gpus = preflight.parse_nvidia_smi(H100_580)
    assert run_check(tmp_path, require_gpu=True, gpus=gpus, need_vram_bytes=40 * GiB) == []


# -- driver vs image flavour --------------------------------------------------------------------------------
def test_cu130_image_on_a_570_driver_names_the_cu128_flavour(tmp_path):
    gpus = preflight.parse_nvidia_smi("0, NVIDIA L4, 570.133.20, 23034, 22000\n")
    (p,) = run_check(tmp_path, require_gpu=True, gpus=gpus, flavour="cu130")
    assert p.severity == "error"
    assert "570.133.20" in p.title and "CUDA 13.0 needs >= 580.65.06" in p.title
    assert "FT_FLAVOUR=cu128 docker compose build train" in p.advice and "580 series" in p.advice


def test_cu128_image_on_a_550_driver_is_a_compatibility_warning(tmp_path):
    gpus = preflight.parse_nvidia_smi(RTX4090_550)
    (p,) = run_check(tmp_path, require_gpu=True, gpus=gpus, flavour="cu128")
    assert p.severity == "warning" and "minor-version compatibility" in p.title and "570.26" in p.advice


def test_driver_too_old_for_any_flavour(tmp_path):
    (p,) = run_check(
        tmp_path,
        require_gpu=True,
        gpus=[Gpu(0, "Tesla T4", "470.82.01", 16 * GiB, 15 * GiB)],
        flavour="cu128",
    )
    assert p.severity == "error" and ">= 525.60.13" in p.title and "Upgrade" in p.advice
    assert "FT_FLAVOUR" not in p.advice


def test_driver_read_from_proc_when_nvidia_smi_is_absent(tmp_path):
    problems = run_check(tmp_path, require_gpu=True, nodes=["nvidia0"], driver="560.35.03", flavour="cu130")
    assert (
        "error",
        "the host's NVIDIA driver is 560.35.03, too old for this cu130 build (CUDA 13.0 needs >= 580.65.06)",
    ) in titles(problems)


def test_cpu_flavour_skips_the_driver_check(tmp_path):
    gpus = preflight.parse_nvidia_smi("0, NVIDIA T4, 470.82.01, 15360, 15000\n")
    assert run_check(tmp_path, gpus=gpus, flavour="cpu") == []


# -- memory and disk ----------------------------------------------------------------------------------------
def test_not_enough_free_vram_names_the_holders(tmp_path):
    gpus = preflight.parse_nvidia_smi(H100_580.replace("80000", "10000"))
    (p,) = run_check(tmp_path, gpus=gpus, need_vram_bytes=20 * GiB)
    assert "20.0 GiB" in p.title and "9.8 GiB free" in p.title and "Other processes hold" in p.advice


def test_gpu_too_small_in_total(tmp_path):
    gpus = preflight.parse_nvidia_smi(RTX4090_550)
    (p,) = run_check(tmp_path, gpus=gpus, need_vram_bytes=40 * GiB, flavour="cu128", driver="570.26")
    assert "in all" in p.title and "ft size" in p.advice


def test_unknown_vram_is_not_an_error(tmp_path):
    assert (
        run_check(tmp_path, gpus=preflight.parse_nvidia_smi(MIG), need_vram_bytes=80 * GiB, flavour="cu128")
        == []
    )


def test_not_enough_disk(tmp_path):
    (p,) = run_check(tmp_path, need_disk_bytes=10**18)
    assert p.severity == "error" and "free on the disk" in p.title


def test_output_dir_that_does_not_exist_yet_is_checked_at_its_parent(tmp_path):
    assert run_check(tmp_path, output_dir=tmp_path / "runs" / "deeper") == []


def test_unwritable_output_dir_in_a_container_explains_docker_root_dirs(tmp_path, monkeypatch):
    # As if Docker had created ./runs as root before the first `docker compose run` (faked: CI runs as root).
    monkeypatch.setattr(preflight.os, "access", lambda path, mode: False)
    (p,) = run_check(tmp_path, output_dir=tmp_path / "runs")
    assert "cannot write" in p.title and "mkdir -p runs bundles" in p.advice and "UID/GID" in p.advice


# -- the flavour of this environment, and the API the CLI calls --------------------------------------------
def test_installed_flavour_prefers_the_image_record(tmp_path, monkeypatch):
    info = tmp_path / "image.json"
    info.write_text('{"flavour": "cu128", "lockfile_sha256": "ab"}')
    monkeypatch.setenv("FT_IMAGE_INFO", str(info))
    assert preflight.installed_flavour() == "cu128"
    assert preflight.in_container()


def test_enforce_prints_warnings_and_raises_on_errors(tmp_path, capsys):
    warn = preflight.Problem("warning", "w", "advice w")
    err = preflight.Problem("error", "e", "advice e")
    preflight.enforce([warn], stream=None)
    assert "preflight warning: w" in capsys.readouterr().err
    with pytest.raises(FtError) as exc:
        preflight.enforce([err, warn])
    assert "preflight error: e\n  advice e" in str(exc.value)


def test_errors_come_first(tmp_path):
    gpus = preflight.parse_nvidia_smi(RTX4090_550)
    problems = run_check(tmp_path, require_gpu=True, gpus=gpus, flavour="cu128", need_vram_bytes=30 * GiB)
    assert [p.severity for p in problems] == ["error", "warning"]


def chosen(device="cuda", backend="hf"):
    """A stand-in for ft.backends.prepare: (device, backend, reason)."""
    return lambda s: (device, backend, "test")


def test_gate_sizes_the_recipe_only_when_a_gpu_is_visible(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(preflight, "vram_need", lambda s, backend=None: asked.append(s) or 70 * GiB)
    s = settings(out=tmp_path)
    common = dict(
        nodes=[], container=True, flavour="cu130", need_disk_bytes=1, driver="580.65.06", prepare=chosen()
    )
    assert preflight.gate(s, gpus=None, **common) == []
    assert asked == []  # no GPU: nothing to compare a prediction with, so nothing heavy is imported
    with pytest.raises(FtError, match="needs about 70.0 GiB of GPU memory"):
        preflight.gate(s, gpus=preflight.parse_nvidia_smi(RTX4090_550), **common)
    assert asked == [s]


def test_gate_chooses_the_backend_after_the_machine_checks_and_before_the_sizing(tmp_path, monkeypatch):
    """Issue 8.1: sizing a Hub model imports transformers, and reading the GPU's facts initialises CUDA;
    Unsloth (imported by ft.backends.prepare) must come before both, and after the checks that explain a
    machine that cannot run at all."""
    events: list = []
    monkeypatch.setattr(
        preflight, "vram_need", lambda s, backend=None: events.append(("size", backend)) or 70 * GiB
    )

    def prepare(device, backend):
        return lambda s: events.append(("prepare", device)) or (device, backend, "test")

    s = settings(out=tmp_path)
    common = dict(nodes=[], container=True, flavour="cu130", need_disk_bytes=1, driver="580.65.06")
    h100 = preflight.parse_nvidia_smi(H100_580)
    assert preflight.gate(s, gpus=h100, prepare=prepare("cuda", "unsloth"), **common) == []
    assert events == [("prepare", "cuda"), ("size", ("unsloth", "test"))]  # sized for the chosen backend

    events.clear()  # trains on the CPU on a GPU machine: the card's memory is no limit
    assert preflight.gate(s, gpus=h100, prepare=prepare("cpu", "hf"), **common) == []
    assert events == [("prepare", "cpu")]

    events.clear()  # a machine that cannot run: stop with the advice, before importing any backend
    with pytest.raises(FtError, match="CPU build of ft"):
        preflight.gate(
            settings(device="cuda", out=tmp_path),
            gpus=None,
            nodes=[],
            flavour="cpu",
            container=True,
            prepare=prepare("cuda", "unsloth"),
        )
    assert events == []


def test_gate_refuses_a_gpu_run_in_the_cpu_image(tmp_path):
    with pytest.raises(FtError, match="CPU build of ft") as exc:
        preflight.gate(
            settings(device="cuda", out=tmp_path), gpus=None, nodes=[], flavour="cpu", container=True
        )
    assert "docker compose run --rm smoke" in str(exc.value)


def test_vram_need_from_the_sizing_model_and_never_raising():
    from ft.config import load_settings

    tiny = load_settings("tiny", [])
    need = preflight.vram_need(tiny)
    assert need is not None and 0 < need < 80 * GiB
    assert preflight.vram_need(settings()) is None  # a settings slice sizing cannot read: no verdict


def test_vram_need_under_torchrun_is_one_ranks_share(monkeypatch):
    """With FSDP each rank holds a shard of the base: the preflight must not refuse a run that fits only
    sharded, by comparing the whole model with one card."""
    from ft.config import load_settings

    fsdp = load_settings(
        "default", ["model.name_or_path=qwen2.5-14b", "train.distributed=fsdp", "train.micro_batch=1"]
    )
    whole = preflight.vram_need(fsdp, backend=("hf", "test"))
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    shard = preflight.vram_need(fsdp, backend=("hf", "test"))
    assert whole is not None and shard is not None
    assert shard < whole * 0.8, (shard / GiB, whole / GiB)
