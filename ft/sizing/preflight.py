"""Preflight: cheap checks before anything heavy loads.

A run that is going to fail on the machine should fail in the first second with a paragraph that says
what to install or change, not twenty minutes later inside CUDA. Checked here, without importing torch:

- a GPU is visible when the run needs one (device nodes, `nvidia-smi`);
- the host's NVIDIA driver is new enough for the image's CUDA flavour (and which flavour it needs);
- enough free GPU memory for the recipe (the number comes from the sizing model);
- the output directory is writable and has room.

    problems = check(settings, need_vram_bytes=sizing_estimate)
    enforce(problems)   # prints warnings, raises FtError with every error paragraph

    gate(settings)      # for a command about to train: machine checks, then the backend, then VRAM

The gate's order matters: Unsloth patches transformers, trl and peft when it is imported, and its import
sets PYTORCH_ALLOC_CONF, which torch reads only when CUDA is initialised. Sizing a Hub model may import
transformers (its config) and reading the GPU's facts initialises CUDA, so the backend is chosen (and
Unsloth imported) between the cheap checks and the VRAM check.

`FT_REQUIRE_GPU=1` (set by compose's `train` service) makes a missing GPU an error even when the recipe
would fall back to the CPU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from ft.errors import FtError

GiB = 1024**3
MiB = 1024**2
DEFAULT_DISK_BYTES = 2 * GiB  # adapter, checkpoints (optimizer state for LoRA only) and bundle of a small run
SMOKE_HINT = (
    "To try ft without a GPU: `docker compose run --rm smoke` (the tiny recipe, on the CPU, offline)."
)

# The NVIDIA driver each image flavour needs (Linux x86_64, CUDA release notes). cu130 (CUDA 13.0): the
# 13.0 GA driver 580.65.06; CUDA 13 has no older compatible branch. cu128 (CUDA 12.8): 570.26 is the
# driver the 12.8 toolkit shipped with; CUDA 12 "minor version compatibility" runs it on >= 525.60.13
# with a limited feature set (no PTX JIT of newer code), so 525-569 is a warning, below 525 an error.
DRIVER_FULL = {"cu130": (580, 65, 6), "cu128": (570, 26)}
DRIVER_FLOOR = {"cu130": (580, 65, 6), "cu128": (525, 60, 13)}
CUDA_OF = {"cu130": "13.0", "cu128": "12.8"}

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One finding: a title line and a paragraph of advice."""

    severity: Severity
    title: str
    advice: str

    def render(self) -> str:
        return f"preflight {self.severity}: {self.title}\n  {self.advice}"


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    driver: str | None
    total_bytes: int | None
    free_bytes: int | None


# -- facts ------------------------------------------------------------------------------------------------
def parse_version(text: str | None) -> tuple[int, ...] | None:
    """'580.65.06' -> (580, 65, 6); None when there is no version in the text."""
    m = re.search(r"\d+(?:\.\d+)*", text or "")
    return tuple(int(p) for p in m.group(0).split(".")) if m else None


def _fmt(version: tuple[int, ...]) -> str:
    return ".".join(f"{p:02d}" if i == 2 else str(p) for i, p in enumerate(version))


def flavour_for_driver(driver: str | None) -> str | None:
    """The newest image flavour this host driver runs fully: cu130, cu128, or None (too old for both)."""
    v = parse_version(driver)
    if v is None:
        return None
    for flavour in ("cu130", "cu128"):
        if v >= DRIVER_FULL[flavour]:
            return flavour
    return "cu128" if v >= DRIVER_FLOOR["cu128"] else None


def _mib(value: str) -> int | None:
    return int(float(value)) * MiB if re.fullmatch(r"\d+(\.\d+)?", value) else None


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """Rows of `nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.free
    --format=csv,noheader,nounits`. Fields that read "[N/A]" (e.g. MIG) become None."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 5 or not parts[0].isdigit():
            continue
        index, name, driver, total, free = parts
        gpus.append(Gpu(int(index), name, driver if parse_version(driver) else None, _mib(total), _mib(free)))
    return gpus


SMI_QUERY = [
    "nvidia-smi",
    "--query-gpu=index,name,driver_version,memory.total,memory.free",
    "--format=csv,noheader,nounits",
]


def query_gpus(runner: Callable[[list[str]], str] | None = None) -> list[Gpu] | None:
    """GPUs as nvidia-smi reports them; None when nvidia-smi is missing or fails."""
    if runner is None:
        if not shutil.which("nvidia-smi"):
            return None

        def runner(cmd: list[str]) -> str:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=15, check=True).stdout

    try:
        return parse_nvidia_smi(runner(SMI_QUERY))
    except (OSError, subprocess.SubprocessError):
        return None


def driver_from_proc(path: Path = Path("/proc/driver/nvidia/version")) -> str | None:
    """The kernel module's version, readable even where nvidia-smi is not mounted into the container."""
    try:
        m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", path.read_text())
    except OSError:
        return None
    return m.group(1) if m else None


def device_nodes(dev: Path = Path("/dev")) -> list[str]:
    return sorted(p.name for p in dev.glob("nvidia[0-9]*"))


def image_info() -> dict[str, Any] | None:
    path = Path(os.environ.get("FT_IMAGE_INFO", "/etc/ft/image.json"))
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def installed_flavour() -> str | None:
    """The CUDA flavour of the environment: the image's record, else torch's own build (no import)."""
    info = image_info()
    if info and info.get("flavour"):
        return str(info["flavour"])
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None
    if "+" in version:
        local = version.split("+", 1)[1]
        return "cpu" if local == "cpu" else local
    # The package index's torch builds carry no local label; the nvidia runtime wheel they pull says which.
    for dist, flavour in (("nvidia-cuda-runtime", "cu130"), ("nvidia-cuda-runtime-cu12", "cu128")):
        try:
            metadata.version(dist)
            return flavour
        except metadata.PackageNotFoundError:
            continue
    return None


def in_container() -> bool:
    return Path("/.dockerenv").exists() or image_info() is not None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def needs_gpu(settings: Any | None) -> bool:
    """Whether the recipe cannot run without CUDA (explicit device, 4-bit loading, Unsloth, 8-bit optimizer)."""
    if settings is None:
        return False
    t, m = settings.train, settings.model
    return t.device == "cuda" or m.quantization == "nf4" or t.backend == "unsloth" or "8bit" in t.optimizer


# -- the checks -------------------------------------------------------------------------------------------
def check(
    settings: Any | None = None,
    *,
    need_vram_bytes: int | None = None,
    need_disk_bytes: int | None = DEFAULT_DISK_BYTES,
    output_dir: str | os.PathLike | None = None,
    require_gpu: bool | None = None,
    flavour: str | None = None,
    gpus: list[Gpu] | None | Literal["query"] = "query",
    nodes: list[str] | None = None,
    driver: str | None = None,
    container: bool | None = None,
) -> list[Problem]:
    """Every problem found, errors first. Keyword arguments override what is read from the machine."""
    problems: list[Problem] = []
    if require_gpu is None:
        require_gpu = _truthy(os.environ.get("FT_REQUIRE_GPU")) or needs_gpu(settings)
    flavour = flavour or installed_flavour()
    gpus = query_gpus() if gpus == "query" else gpus
    nodes = device_nodes() if nodes is None else nodes
    container = in_container() if container is None else container
    driver = driver or next((g.driver for g in gpus or [] if g.driver), None) or driver_from_proc()

    if require_gpu:
        problems += _gpu_problems(flavour, gpus, nodes, container)
    if driver and flavour in DRIVER_FLOOR and (require_gpu or gpus or nodes):
        problems += _driver_problems(driver, flavour, container)
    if need_vram_bytes and gpus:
        problems += _vram_problems(gpus[0], need_vram_bytes)
    out = Path(
        output_dir if output_dir is not None else getattr(getattr(settings, "output", None), "dir", "runs")
    )
    problems += _disk_problems(out, need_disk_bytes, container)
    return sorted(problems, key=lambda p: p.severity != "error")


def _gpu_problems(
    flavour: str | None, gpus: list[Gpu] | None, nodes: list[str], container: bool
) -> list[Problem]:
    if flavour == "cpu":
        return [
            Problem(
                "error",
                "this is the CPU build of ft, but the run needs a GPU",
                "Build or pull the CUDA image (`docker compose build train`, flavour cu130 by default, or "
                "FT_FLAVOUR=cu128 for drivers older than 580) and run it with `docker compose run --rm train`. "
                + SMOKE_HINT,
            )
        ]
    if gpus or nodes:
        if not gpus:
            return [
                Problem(
                    "warning",
                    f"NVIDIA device nodes are present ({', '.join(nodes)}) but nvidia-smi is not",
                    "The driver version and free GPU memory cannot be checked. In a container, set "
                    "NVIDIA_DRIVER_CAPABILITIES=compute,utility (ft's image does) so the NVIDIA Container Toolkit "
                    "mounts nvidia-smi.",
                )
            ]
        return []
    if container:
        advice = (
            "The container sees no NVIDIA GPU. On the host: (1) install the NVIDIA driver (580 or newer for "
            "the default cu130 image; `nvidia-smi` must work on the host); (2) install the NVIDIA Container "
            "Toolkit and register it with Docker (`sudo nvidia-ctk runtime configure --runtime=docker` and "
            "restart Docker); (3) start the container with the GPU: `docker compose run --rm train` reserves "
            "it, plain docker needs `docker run --gpus all`. " + SMOKE_HINT
        )
    else:
        advice = (
            "No NVIDIA GPU is visible on this machine (no /dev/nvidia* device, no nvidia-smi). Install the "
            "NVIDIA driver, or run on a machine with a GPU; to train on the CPU anyway, set "
            "train.device=cpu and model.quantization=none (slow: only for tiny models). " + SMOKE_HINT
        )
    return [Problem("error", "no GPU visible, and this run needs one", advice)]


def _driver_problems(driver: str, flavour: str, container: bool) -> list[Problem]:
    v = parse_version(driver)
    if v is None:
        return []
    floor, full = DRIVER_FLOOR[flavour], DRIVER_FULL[flavour]
    fits = flavour_for_driver(driver)
    upgrade = "Upgrade the host's NVIDIA driver to the 580 series or newer"
    if v < floor:
        if fits:
            advice = (
                f"{upgrade}, or use the {fits} image, which this driver runs: "
                f"`FT_FLAVOUR={fits} docker compose build train` then `FT_FLAVOUR={fits} docker compose run --rm train` "
                f"(or `nox -s build -- --flavour {fits}`)."
            )
        else:
            advice = f"{upgrade} (570 or newer at the very least, for the cu128 image). " + SMOKE_HINT
        where = "the host's NVIDIA driver" if container else "the NVIDIA driver"
        return [
            Problem(
                "error",
                f"{where} is {driver}, too old for this {flavour} build (CUDA {CUDA_OF[flavour]} needs >= {_fmt(floor)})",
                advice,
            )
        ]
    if v < full:
        return [
            Problem(
                "warning",
                f"NVIDIA driver {driver} runs CUDA {CUDA_OF[flavour]} only in minor-version compatibility mode",
                f"Most training works, but kernels compiled at run time can fail with 'unsupported toolchain'. "
                f"Upgrading the driver to {_fmt(full)} or newer removes the limitation.",
            )
        ]
    return []


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _vram_problems(gpu: Gpu, need: int) -> list[Problem]:
    if gpu.total_bytes is not None and gpu.total_bytes < need:
        return [
            Problem(
                "error",
                f"the recipe needs about {_gib(need)} of GPU memory; GPU {gpu.index} ({gpu.name}) has {_gib(gpu.total_bytes)} in all",
                "Lower train.max_seq_length or train.micro_batch (micro_batch=auto picks the largest that fits), "
                "keep model.quantization=nf4, or choose a smaller base model. `ft size` shows what fits this GPU.",
            )
        ]
    if gpu.free_bytes is not None and gpu.free_bytes < need:
        held = _gib(gpu.total_bytes - gpu.free_bytes) if gpu.total_bytes is not None else "some"
        return [
            Problem(
                "error",
                f"the recipe needs about {_gib(need)} of GPU memory; GPU {gpu.index} ({gpu.name}) has {_gib(gpu.free_bytes)} free",
                f"Other processes hold {held} (see `nvidia-smi` on the host): stop them, or lower "
                "train.max_seq_length / train.micro_batch. `ft size` shows what fits.",
            )
        ]
    return []


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _disk_problems(out: Path, need: int | None, container: bool) -> list[Problem]:
    base = _existing_parent(out)
    problems = []
    if not os.access(base, os.W_OK | os.X_OK):
        owner = base.stat().st_uid
        fix = (
            "Docker creates missing bind-mount folders as root: on the host run `mkdir -p runs bundles` before "
            "`docker compose run`, or `sudo chown -R $(id -u):$(id -g) runs bundles`, and set UID/GID in .env "
            "to your `id -u`/`id -g`."
            if container
            else "Choose another output.dir or fix the folder's permissions."
        )
        problems.append(
            Problem(
                "error",
                f"cannot write to {base} (owned by uid {owner}, running as uid {os.getuid()})",
                fix,
            )
        )
    if need:
        free = shutil.disk_usage(base).free
        if free < need:
            problems.append(
                Problem(
                    "error",
                    f"only {_gib(free)} free on the disk of {base}; the run needs about {_gib(need)}",
                    "Free some space (old runs, `docker system prune` for unused images and build cache) or point "
                    "output.dir at a larger disk.",
                )
            )
    return problems


def vram_need(settings: Any, backend: tuple[str, str] | None = None) -> int | None:
    """GPU memory the recipe needs by the sizing model (bytes on the card), or None where it cannot say.

    With `train.micro_batch: auto` that is the need at micro-batch 1, the least training can fall back
    to. No training rows are counted (only the memory prediction is used, not the time). `backend` is
    (name, reason) of the backend that will train, when it is already chosen. Never raises: a preflight
    that cannot size the model still checks everything else.
    """
    try:
        from ft import sizing

        micro = 1 if settings.train.micro_batch == "auto" else None
        # Under torchrun each rank holds its own share (FSDP shards the base): size one rank, not the run.
        world = _env_int("WORLD_SIZE", 1)
        nproc = _env_int("LOCAL_WORLD_SIZE", world)
        per_rank = {"nproc": nproc, "nodes": max(1, world // max(1, nproc))} if world > 1 else {}
        report = sizing.size_report(
            settings, micro_batch=micro, data_stats={"train_rows": 0}, backend=backend, **per_rank
        )
        if report.ranks is not None:
            return int(report.ranks.rank.total_bytes)
        return int(report.estimate.total_bytes)
    except Exception:
        return None


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name) or default)
    except ValueError:
        return default


def _prepare_backend(settings: Any) -> tuple[str, str, str]:
    from ft import backends

    return backends.prepare(settings)


def gate(
    settings: Any | None = None,
    *,
    gpus: list[Gpu] | None | Literal["query"] = "query",
    need_vram_bytes: int | None = None,
    stream=None,
    prepare: Callable[[Any], tuple[str, str, str]] | None = _prepare_backend,
    **kw: Any,
) -> list[Problem]:
    """The preflight of a command about to train (`ft run`, `ft train`): check, print warnings, raise on errors.

    In this order: (1) the machine checks, which import nothing heavy (a run that cannot work fails here,
    with the advice); (2) `prepare(settings)` (default `ft.backends.prepare`) decides the device and
    backend and, for Unsloth, imports it, first of all heavy imports and before CUDA is initialised;
    (3) the VRAM need from the sizing model, asked only when a GPU is visible (without one there is no
    memory to compare with, and nothing heavy is imported). Other keyword arguments go to `check`.
    """
    gpus = query_gpus() if gpus == "query" else gpus
    problems = check(settings, gpus=gpus, **kw)
    enforce(problems, stream)
    chosen = prepare(settings) if prepare is not None and settings is not None else None
    if chosen is not None and chosen[0] != "cuda":
        return problems  # trains on the CPU: the GPU's memory is not the limit
    if need_vram_bytes is None and gpus and settings is not None:
        need_vram_bytes = vram_need(settings, chosen[1:] if chosen else None)
    if need_vram_bytes and gpus:
        vram = _vram_problems(gpus[0], need_vram_bytes)
        enforce(vram, stream)
        problems += vram
    return problems


def render(problems: list[Problem]) -> str:
    """All findings as paragraphs separated by blank lines."""
    return "\n\n".join(p.render() for p in problems)


def enforce(problems: list[Problem], stream=None) -> None:
    """Print warnings; raise FtError carrying every error paragraph (exit code 2) if there are any."""
    stream = stream or sys.stderr
    warnings = [p for p in problems if p.severity == "warning"]
    errors = [p for p in problems if p.severity == "error"]
    if warnings:
        print(render(warnings), file=stream, flush=True)
    if errors:
        raise FtError(render(errors))
