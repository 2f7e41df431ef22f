"""The CUDA images install only native extensions built for their torch, and only on the Python the locks
were resolved for (issue 8, item 7). Static checks plus the Dockerfile's shell guards run with fakes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()

# xformers ships one wheel per release, compiled against one torch + CUDA build (its wheel's
# xformers/cpp_lib.json). Its _C.so links that torch's C++ ABI and that CUDA's libcudart, so it loads
# beside no other build. Add a release here only after reading its cpp_lib.json.
XFORMERS_BUILT_FOR = {"0.0.35": ("2.10.0", "12")}  # torch 2.10.0+cu128, needs libcudart.so.12
FLAVOUR_CUDA = {"cu130": "13", "cu128": "12"}


def _pins(flavour: str) -> dict[str, str]:
    lock = (ROOT / "lockfiles" / f"{flavour}.txt").read_text()
    return {m[0].lower(): m[1] for m in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock, flags=re.M)}


@pytest.mark.parametrize("flavour", sorted(FLAVOUR_CUDA))
def test_xformers_in_a_cuda_lock_is_built_for_its_torch_and_cuda(flavour):
    pins = _pins(flavour)
    if "xformers" not in pins:
        return  # Unsloth falls back to PyTorch's SDPA attention
    built = XFORMERS_BUILT_FOR.get(pins["xformers"])
    assert built is not None, f"{flavour}: xformers {pins['xformers']}: which torch is it built for?"
    assert built == (pins["torch"], FLAVOUR_CUDA[flavour]), (
        f"{flavour}: xformers {pins['xformers']} is built for torch {built[0]} + CUDA {built[1]}, "
        f"the lock has torch {pins['torch']} + CUDA {FLAVOUR_CUDA[flavour]}"
    )


def test_cu130_leaves_xformers_out_and_the_lock_session_reproduces_that():
    assert "xformers" not in _pins("cu130")
    assert "xformers" in _pins("cu128")  # 0.0.35 is torch 2.10.0+cu128's own build: kept
    noxfile = (ROOT / "noxfile.py").read_text()
    cu130 = re.search(r'"cu130": \[([^\]]*)\]', noxfile)
    assert cu130 and '"--no-emit-package", "xformers"' in cu130.group(1)


def _pip_check_fragment() -> str:
    """The shell that runs `pip check` in the builder stage (continuation lines joined)."""
    run = DOCKERFILE[DOCKERFILE.index("pip install --require-hashes") :]
    run = run[: run.index("\n# ft itself")]
    text = re.sub(r"\\\n\s*", " ", run)
    return text[text.index("if ! pip check") :].strip()


def _fake(tmp_path: Path, name: str, script: str) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / name
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin"}


@pytest.mark.parametrize(
    ("output", "status", "passes"),
    [
        ("No broken requirements found.", 0, True),
        ("unsloth 2026.10.5 requires xformers, which is not installed.", 1, True),
        (
            "unsloth 2026.10.5 requires xformers, which is not installed.\ntrl 1.14.2 requires rich, which is not installed.",
            1,
            False,
        ),
        ("peft 0.21.2 has requirement torch>=2.4, but you have torch 2.1.", 1, False),
        ("unsloth-zoo 2026.10.7 requires xformers, which is not installed.", 1, False),
    ],
)
def test_image_pip_check_tolerates_only_unsloths_missing_xformers(tmp_path, output, status, passes):
    env = _fake(tmp_path, "pip", f"cat <<'EOF'\n{output}\nEOF\nexit {status}\n")
    shell = _pip_check_fragment().replace("/tmp/pip-check.txt", str(tmp_path / "check.txt"))
    done = subprocess.run(["sh", "-c", shell], env=env, capture_output=True, text=True)
    assert (done.returncode == 0) == passes, (shell, done.stdout, done.stderr)


def _python_guard() -> str:
    start = DOCKERFILE.index('case "$(python3 -V)"')
    return DOCKERFILE[start : DOCKERFILE.index("esac", start) + 4]


@pytest.mark.parametrize(("version", "passes"), [("3.11.2", True), ("3.12.3", False), ("3.10.12", False)])
def test_image_refuses_a_base_whose_python_cannot_install_the_cp311_locks(tmp_path, version, passes):
    # nvidia/cuda's Ubuntu bases ship 3.10 (22.04) or 3.12 (24.04); the locks hold cp311 wheels only.
    assert '"--python-version", "3.11"' in (ROOT / "noxfile.py").read_text()
    env = _fake(tmp_path, "python3", f"echo 'Python {version}'\n")
    done = subprocess.run(["sh", "-c", _python_guard()], env=env, capture_output=True, text=True)
    assert (done.returncode == 0) == passes, done.stderr
    if not passes:
        assert "3.11" in done.stderr and version in done.stderr
    assert "an nvidia/cuda base works" not in DOCKERFILE
