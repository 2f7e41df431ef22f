"""The environment manifest: what produced a number.

Captured once per run and embedded in (or pointed to, with its sha256, from) every output: Python and
OS, CPU, GPUs, NVIDIA driver, CUDA/cuDNN as torch sees them, key package versions and every installed
distribution, the lockfile hash, the image and git commit when known. It records a whitelist of facts
and never the environment wholesale, so tokens and keys cannot leak into it.

Only cheap imports at module level: `ft env --short` and the CLI's startup must stay fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

KEY_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "bitsandbytes",
    "unsloth",
    "unsloth_zoo",
    "tokenizers",
    "safetensors",
    "pydantic",
    "pydantic-settings",
    "triton",
    "ft",
)
# Written into the image at build time (see Dockerfile); absent outside the container.
IMAGE_INFO = Path(os.environ.get("FT_IMAGE_INFO", "/etc/ft/image.json"))
# The checkout's locks; outside an image, $FT_LOCKFILE (default cpu.txt) names the one installed.
LOCK_DIR = Path(__file__).resolve().parent.parent / "lockfiles"
# Installed beside a lock but never in it: ft itself (installed after the lock, from source) and the
# venv's own installer. Everything else installed and not locked is a difference worth recording.
NOT_LOCKED = frozenset({"ft", "pip"})
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.M)
# Environment variables worth recording: they change what runs where. Nothing else is ever read.
RECORDED_ENV = (
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "HF_HUB_OFFLINE",
    "PYTORCH_CUDA_ALLOC_CONF",
    "CUBLAS_WORKSPACE_CONFIG",
    "OMP_NUM_THREADS",
    "FT_IMAGE_ID",
)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def installed_distributions() -> dict[str, str]:
    dists = {}
    for dist in metadata.distributions():
        name = dist.metadata.get("Name")
        if name:
            dists[name.lower()] = dist.version
    return dict(sorted(dists.items()))


def cuda_available() -> bool:
    """True when torch sees a CUDA device. Avoids importing torch when no NVIDIA device node exists."""
    if not any(Path("/dev").glob("nvidia[0-9]*")) and not os.environ.get("FT_ASSUME_CUDA"):
        return False
    import torch

    return torch.cuda.is_available()


def _nvidia_smi() -> list[dict[str, str]]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "memory_mib": parts[1], "driver": parts[2]})
    return gpus


def gpu_facts(with_torch: bool) -> dict[str, Any]:
    smi = _nvidia_smi()
    facts: dict[str, Any] = {
        "count": len(smi),
        "devices": [{"name": g["name"], "memory_bytes": int(float(g["memory_mib"]) * 2**20)} for g in smi],
        "driver": smi[0]["driver"] if smi else None,
        "cuda_runtime": None,
        "cudnn": None,
    }
    if with_torch:
        import torch

        facts["cuda_runtime"] = torch.version.cuda
        if torch.cuda.is_available():
            facts["count"] = torch.cuda.device_count()
            facts["devices"] = [
                {
                    "name": torch.cuda.get_device_name(i),
                    "memory_bytes": torch.cuda.get_device_properties(i).total_memory,
                    "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                }
                for i in range(torch.cuda.device_count())
            ]
            cudnn = torch.backends.cudnn.version()
            facts["cudnn"] = str(cudnn) if cudnn else None
    return facts


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The commit of the source ft runs from (checkout), or the one baked into the image."""
    if env := os.environ.get("FT_GIT_COMMIT"):
        return env
    src = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def image_facts() -> dict[str, Any] | None:
    if not IMAGE_INFO.is_file():
        return None
    try:
        info = json.loads(IMAGE_INFO.read_text())
    except (OSError, ValueError):
        return None
    if image_id := os.environ.get("FT_IMAGE_ID"):
        info["id"] = image_id
    return info


def lockfile_facts(image: dict[str, Any] | None) -> dict[str, Any] | None:
    """The lock this environment was installed from: the image's, else the checkout's CPU lock."""
    if image and image.get("lockfile_sha256"):
        return {"name": image.get("lockfile"), "sha256": image["lockfile_sha256"], "source": "image"}
    name = os.environ.get("FT_LOCKFILE", "cpu.txt")
    path = LOCK_DIR / name
    if path.is_file():
        return {"name": name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "source": "checkout"}
    return None


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them (`typing_extensions` is `typing-extensions`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """{name: version} of every `name==version` pin in a hashed requirements lock."""
    text = Path(path).read_text(encoding="utf-8")
    return {normalise(name): version for name, version in _PIN.findall(text)}


def lock_differences(locked: dict[str, str], installed: dict[str, str]) -> list[dict[str, str | None]]:
    """What is installed at another version than locked, locked but missing, or installed but not locked."""
    have = {normalise(name): version for name, version in installed.items()}
    want = {normalise(name): version for name, version in locked.items()}
    return [
        {"name": name, "locked": want.get(name), "installed": have.get(name)}
        for name in sorted(set(want) | set(have))
        if name not in NOT_LOCKED and want.get(name) != have.get(name)
    ]


def lock_status(image: dict[str, Any] | None) -> str | list[dict[str, str | None]] | None:
    """`matches` when the installed distributions are exactly the lock's, else what differs.

    The lock compared is the one this environment claims (the image's installed lock, else the
    checkout's), so a sha256 in the manifest never vouches for packages that are not the locked ones.
    None when no lock is known (a plain `pip install` outside the checkout).
    """
    if image and image.get("lockfile_sha256"):
        path = Path(image["lockfile_path"]) if image.get("lockfile_path") else None
    else:
        path = LOCK_DIR / os.environ.get("FT_LOCKFILE", "cpu.txt")
    if path is None or not path.is_file():
        return None
    try:
        locked = read_lock(path)
    except (OSError, UnicodeDecodeError):
        return None
    return lock_differences(locked, installed_distributions()) or "matches"


def lock_summary(status: Any, limit: int = 5) -> str | None:
    """One line for a recorded lock status (`ft env`, `ft reproduce`): "matches" or what differs."""
    if status is None or status == "matches":
        return status
    if not isinstance(status, list):
        return str(status)
    shown = []
    for d in (d for d in status[:limit] if isinstance(d, dict)):
        name, locked, installed = d.get("name"), d.get("locked"), d.get("installed")
        if locked is None:
            shown.append(f"{name} {installed} installed, not locked")
        elif installed is None:
            shown.append(f"{name} {locked} locked, not installed")
        else:
            shown.append(f"{name} {locked} locked, {installed} installed")
    more = f"; and {len(status) - limit} more" if len(status) > limit else ""
    return "differs: " + "; ".join(shown) + more


def capture(*, with_torch: bool = True, full: bool = True) -> dict[str, Any]:
    """The environment manifest as a JSON-able dict."""
    image = image_facts()
    manifest: dict[str, Any] = {
        "format": "ft-env/1",
        "captured": utc_now(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "os": f"{platform.system()} {platform.release()}",
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": {"name": _cpu_name(), "count": os.cpu_count()},
        "gpu": gpu_facts(with_torch),
        "packages": {name: _version(name) for name in KEY_PACKAGES},
        "lockfile": lockfile_facts(image),
        "lock": lock_status(image),
        "image": image,
        "git_commit": git_commit() or (image or {}).get("git_commit"),
        "env": {k: os.environ[k] for k in RECORDED_ENV if k in os.environ},
    }
    if with_torch:
        import torch

        manifest["torch"] = {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "debug": torch.version.debug,
            "threads": torch.get_num_threads(),
        }
    if full:
        manifest["distributions"] = installed_distributions()
    return manifest


def digest(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()


def _render_lock(status: Any, name: str | None) -> str:
    if status is None:
        return "- (no lock to compare with)"
    if status == "matches":
        return f"matches {name}: every installed distribution is the locked one"
    summary = lock_summary(status) or ""
    return f"differs from {name} in {len(status)} packages: {summary.removeprefix('differs: ')}"


def render(manifest: dict[str, Any]) -> str:
    gpu = manifest["gpu"]
    gpus = ", ".join(d["name"] for d in gpu["devices"]) or "none"
    pk = manifest["packages"]
    lock = manifest.get("lockfile") or {}
    image = manifest.get("image") or {}
    lines = [
        f"python        {manifest['python']} ({manifest['platform']})",
        f"cpu           {manifest['cpu']['name']} x{manifest['cpu']['count']}",
        f"gpu           {gpus} (driver {gpu['driver'] or '-'}, CUDA runtime {gpu['cuda_runtime'] or '-'}, cuDNN {gpu['cudnn'] or '-'})",
        "packages      " + ", ".join(f"{k} {v}" for k, v in pk.items() if v),
        "not installed " + (", ".join(k for k, v in pk.items() if not v) or "-"),
        f"lockfile      {lock.get('name', '-')} sha256:{(lock.get('sha256') or '-')[:16]} ({lock.get('source', '-')})",
        "lock          " + _render_lock(manifest.get("lock"), lock.get("name")),
        f"image         {image.get('id') or image.get('flavour') or '-'}",
        f"git commit    {manifest.get('git_commit') or '-'}",
    ]
    if "distributions" in manifest:
        lines.append(f"distributions {len(manifest['distributions'])} installed (listed in the JSON form)")
    lines += render_nodes(manifest.get("distributed"))
    return "\n".join(lines)


def render_nodes(dist: dict[str, Any] | None) -> list[str]:
    """Lines for a run trained by several processes: world size and each node's host facts (gathered
    over the process group by ft.train.distributed.topology); nothing for a single-process run."""
    if not dist:
        return []
    lines = [
        f"processes     {dist.get('world_size')} ({dist.get('mode', '?')}), {dist.get('nproc_per_node')} per node "
        f"on {dist.get('nnodes')} node(s)"
    ]
    for node in dist.get("nodes", []):
        gpus = ", ".join(node.get("gpus") or []) or "no GPU"
        lines.append(
            f"node          {node.get('hostname')}: ranks {node.get('ranks')}, {gpus} (driver "
            f"{node.get('driver') or '-'}, CUDA {node.get('cuda') or '-'}), cpu {(node.get('cpu') or {}).get('name')}"
        )
    return lines
