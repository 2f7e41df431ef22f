"""Static checks of the container definition: Dockerfile, compose.yaml, .dockerignore, env/, lockfiles/.

These run anywhere, without a Docker engine, except those marked `docker` (deselected by `nox -s tests`):
they inspect and run a built image, and `nox -s image_smoke` runs them against the image it has just built.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
COMPOSE_TEXT = (ROOT / "compose.yaml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
LOCKS = {f: (ROOT / "lockfiles" / f"{f}.txt").read_text() for f in ("cpu", "cu128", "cu130")}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def load_env_module(name: str):
    spec = importlib.util.spec_from_file_location(f"ft_env_{name}", ROOT / "env" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        current += " " + line.rstrip("\\").strip() if current else line.rstrip("\\").strip()
        if not raw.rstrip().endswith("\\"):
            lines.append(current)
            current = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


INSTR = instructions(DOCKERFILE)


def pins(lock: str) -> dict[str, str]:
    return {m[0].lower(): m[1] for m in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock, flags=re.M)}


# -- Dockerfile ---------------------------------------------------------------------------------------------
def test_base_image_default_is_the_digest_pin_in_env():
    pin = next(
        ln.strip()
        for ln in (ROOT / "env/base-image.txt").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    )
    assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", pin), pin
    first = INSTR[0]
    assert first == ("ARG", f"BASE_IMAGE={pin}")
    assert ("FROM", "${BASE_IMAGE} AS python") in INSTR


def test_no_syntax_directive_that_would_pull_a_frontend():
    assert not re.search(r"^#\s*syntax=", DOCKERFILE, flags=re.M | re.I)


def test_multi_stage_with_dependencies_before_source():
    froms = [a for i, a in INSTR if i == "FROM"]
    assert len(froms) >= 3
    install = next(n for n, (i, a) in enumerate(INSTR) if i == "RUN" and "--require-hashes" in a)
    copy_src = next(n for n, (i, a) in enumerate(INSTR) if i == "COPY" and a.split()[0] == "ft")
    assert install < copy_src, "dependencies must install before the source is copied (layer cache)"


def test_every_pip_install_of_requirements_is_hash_checked_and_no_deps():
    for ins, args in INSTR:
        if ins == "RUN" and "pip install" in args:
            if " -r " in args:
                assert "--require-hashes" in args and "--no-deps" in args
            else:  # the project itself: local source, nothing from an index
                assert "--no-index" in args and "--no-deps" in args


def test_buildkit_cache_and_optional_secrets_never_copied():
    run = next(a for i, a in INSTR if i == "RUN" and "--require-hashes" in a)
    assert "--mount=type=cache,target=/root/.cache/pip" in run
    assert "--mount=type=secret,id=ca" in run and "--mount=type=secret,id=index_url" in run
    assert "if [ -s /run/secrets/ca ]" in run  # used only when given
    for ins, args in INSTR:
        if ins in ("COPY", "ADD"):
            assert "secret" not in args and ".env" not in args


def test_no_build_arg_or_env_can_carry_a_secret():
    for ins, args in INSTR:
        if ins in ("ARG", "ENV"):
            assert not re.search(r"TOKEN|SECRET|PASSWORD|INDEX_URL|_KEY\b", args, flags=re.I), args


def test_runtime_has_compiler_nvidia_env_and_non_root_exec_entrypoint():
    runtime = DOCKERFILE[DOCKERFILE.index("AS runtime") :]
    assert re.search(r"apt-get install[^\n]*gcc[^\n]*python3-dev", runtime)
    assert "NVIDIA_VISIBLE_DEVICES=all" in runtime and "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in runtime
    assert "HF_HOME=/cache/huggingface" in runtime
    users = [a for i, a in INSTR if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    entry = [a for i, a in INSTR if i == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["ft"], 'exec-form ENTRYPOINT ["ft"]'


def test_labels_and_image_facts():
    labels = " ".join(a for i, a in INSTR if i == "LABEL")
    for key in (
        "org.opencontainers.image.revision",
        "org.opencontainers.image.created",
        "ft.lockfile.sha256",
        "ft.git.commit",
        "ft.build.time",
        "ft.base.image",
        "ft.flavour",
    ):
        assert key + "=" in labels
    assert "/etc/ft/image.json" in DOCKERFILE


def test_dockerignore_is_an_allow_list_that_covers_what_the_build_reads():
    rules = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert rules[0] == "*"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert ".env" not in allowed and ".git" not in allowed
    sources = [a.split()[0] for i, a in INSTR if i == "COPY" and "--from" not in a]
    sources += re.findall(r"type=bind,source=([^,\s]+)", DOCKERFILE)
    for src in sources:
        src = src.replace("${FLAVOUR}", "cpu")
        assert any(src == a or src.startswith(a + "/") for a in allowed), f"{src} is not in the build context"


def test_image_facts_script(tmp_path, monkeypatch):
    facts = load_env_module("image_facts")
    lock = tmp_path / "requirements.lock"
    lock.write_text("torch==2.13.0+cpu \\\n    --hash=sha256:00\n")
    out = tmp_path / "etc/ft/image.json"
    monkeypatch.setenv("FLAVOUR", "cpu")
    monkeypatch.setenv("GIT_COMMIT", "abc123")
    monkeypatch.setenv("LOCK_SHA256", hashlib.sha256(lock.read_bytes()).hexdigest())
    assert facts.main(str(lock), str(out)) == 0
    data = json.loads(out.read_text())
    # The keys ft.manifest reads from the image record.
    assert data["flavour"] == "cpu" and data["lockfile"] == "cpu.txt" and data["git_commit"] == "abc123"
    assert data["lockfile_sha256"] == hashlib.sha256(lock.read_bytes()).hexdigest()
    monkeypatch.setenv("LOCK_SHA256", "0" * 64)
    assert facts.main(str(lock), str(out)) == 1


# -- compose.yaml -------------------------------------------------------------------------------------------
SERVICES = COMPOSE["services"]


def test_compose_has_the_services():
    assert {"train", "size", "eval", "package", "verify", "smoke"} <= set(SERVICES)


def test_compose_gpu_reservation_for_gpu_services():
    for name in ("train", "size", "eval"):
        (device,) = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert device.get("count") in (1, "all")
    assert "deploy" not in SERVICES["smoke"]


def test_compose_train_runs_ft_run_on_the_default_recipe():
    train = SERVICES["train"]
    assert train["entrypoint"] == ["ft", "run"]
    assert train["environment"]["FT_RECIPE"] == "${FT_RECIPE:-default}"
    assert train["environment"]["FT_REQUIRE_GPU"] == "1"


def test_compose_smoke_is_offline_cpu_tiny():
    smoke = SERVICES["smoke"]
    assert smoke["network_mode"] == "none"
    env = smoke["environment"]
    assert env["FT_RECIPE"] == "tiny" and env["HF_HUB_OFFLINE"] == "1" and env["FT_TRAIN__DEVICE"] == "cpu"
    assert smoke["entrypoint"] == ["ft", "run"]


def test_compose_user_mounts_and_token_pass_through():
    for name, svc in SERVICES.items():
        assert svc["user"] == "${UID:-1000}:${GID:-1000}", name
        assert {
            "./data:/workspace/data:ro",
            "./runs:/workspace/runs",
            "./bundles:/workspace/bundles",
            "hf-cache:/cache",
        } <= set(svc["volumes"]), name
        # A pass-through (no value): the token is never written into the file or interpolated into it.
        assert "HF_TOKEN" in svc["environment"] and svc["environment"]["HF_TOKEN"] is None, name
        assert "FT_IMAGE_ID" in svc["environment"] and svc["environment"]["FT_IMAGE_ID"] is None
    assert "hf-cache" in COMPOSE["volumes"]


def test_compose_avoids_what_docker_compose_1_29_rejects():
    # `env_file: {required: false}` is Compose v2.24+; the implicit .env works in both.
    assert all("env_file" not in svc for svc in SERVICES.values())
    assert not re.search(r"\$\{[^}]*\$\{", COMPOSE_TEXT), "nested ${...} defaults are v2-only"
    assert "version" not in COMPOSE


@pytest.mark.skipif(not shutil.which("docker-compose"), reason="docker-compose is not installed")
def test_docker_compose_config_validates(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    proc = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "compose.yaml"), "--project-directory", str(tmp_path), "config"],
        capture_output=True,
        text=True,
        env={**env, "FT_FLAVOUR": "cpu", "UID": "4242", "GID": "4343"},
    )
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["services"]["smoke"]["image"] == "ft:cpu"
    assert resolved["services"]["train"]["user"] == "4242:4343"
    assert f"{tmp_path}/runs:/workspace/runs:rw" in resolved["services"]["smoke"]["volumes"]


# -- the built image (needs a Docker engine; `nox -s image_smoke` runs these against the image it built) --
def _built_image() -> tuple[str, dict, str]:
    """(docker CLI, `docker image inspect` of FT_TEST_IMAGE or ft:cpu, the reference); skip without them."""
    ref = os.environ.get("FT_TEST_IMAGE", "ft:cpu")
    cli = shutil.which("docker")
    if not cli:
        pytest.skip("no docker client here")
    proc = subprocess.run([cli, "image", "inspect", ref], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"no Docker engine, or no image {ref} in it (`nox -s image_smoke` builds ft:cpu)")
    return cli, json.loads(proc.stdout)[0], ref


def _in_image(cli: str, ref: str, *cmd: str) -> str:
    proc = subprocess.run(
        [cli, "run", "--rm", "--network", "none", "--entrypoint", cmd[0], ref, *cmd[1:]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.docker
def test_built_image_runs_as_non_root_and_records_its_lock():
    cli, attrs, ref = _built_image()
    config = attrs["Config"]
    assert config["User"] and config["User"].split(":")[0] not in ("0", "root")
    assert _in_image(cli, ref, "id", "-u").strip() not in ("", "0")
    assert config["Entrypoint"] == ["ft"]
    labels = config["Labels"]
    facts = json.loads(_in_image(cli, ref, "cat", "/etc/ft/image.json"))
    lock = _in_image(cli, ref, "sha256sum", "/etc/ft/requirements.lock").split()[0]
    assert facts["lockfile_sha256"] == labels["ft.lockfile.sha256"] == lock
    assert facts["flavour"] == labels["ft.flavour"] and facts["git_commit"] == labels["ft.git.commit"]
    assert lock == hashlib.sha256(LOCKS[facts["flavour"]].encode()).hexdigest(), (
        "image built from another lock"
    )
    assert not any(e.startswith(("HF_TOKEN=", "PIP_INDEX_URL=", "PIP_CERT=")) for e in config["Env"])


# -- env/ and lockfiles/ ------------------------------------------------------------------------------------
def test_every_lock_is_fully_hashed_and_machine_free():
    for name, lock in LOCKS.items():
        assert lock.startswith(
            "# This file was autogenerated by uv via the following command:\n#    nox -s lock\n"
        )
        blocks = re.split(r"\n(?=[A-Za-z0-9])", lock.split("\n", 2)[2].strip())
        for block in blocks:
            assert "--hash=sha256:" in block, f"{name}: {block.splitlines()[0]} has no hash"
        assert not re.search(r"file:|https?://|--index-url|--find-links|--extra-index-url", lock), name
        for var in ("PIP_FIND_LINKS", "HOME"):
            value = os.environ.get(var)
            if value and len(value) > 1:
                assert value not in lock, f"{name} contains this machine's {var}"


def test_cpu_lock_is_the_cpu_environment():
    cpu = pins(LOCKS["cpu"])
    assert cpu["torch"] == "2.13.0+cpu"
    assert "pytest" in cpu and "setuptools" in cpu
    for banned in ("unsloth", "unsloth-zoo", "triton", "torchvision", "bitsandbytes", "xformers"):
        assert banned not in cpu, f"{banned} must stay out of the CPU lock"
    assert not [p for p in cpu if p.startswith("nvidia-")]


@pytest.mark.parametrize(
    ("flavour", "torch", "runtime"),
    [("cu130", "2.13.0", "nvidia-cuda-runtime"), ("cu128", "2.10.0", "nvidia-cuda-runtime-cu12")],
)
def test_cuda_locks(flavour, torch, runtime):
    p = pins(LOCKS[flavour])
    assert p["torch"] == torch
    assert p[runtime].startswith("13." if flavour == "cu130" else "12.8")
    assert p["bitsandbytes"] == "0.50.2" and p["unsloth"] == "2026.10.5" and p["unsloth-zoo"] == "2026.10.7"
    assert "pytest" not in p


def test_locks_honour_the_exact_pins_of_pyproject():
    exact = dict(
        re.match(r"([A-Za-z0-9_.-]+)==(\S+)", d).groups()
        for d in PYPROJECT["project"]["dependencies"]
        if "==" in d
    )
    gpu = dict(
        re.match(r"([A-Za-z0-9_.-]+)==(\S+)", d).groups()
        for d in PYPROJECT["project"]["optional-dependencies"]["gpu"]
    )
    for flavour, lock in LOCKS.items():
        p = pins(lock)
        for name, version in {**exact, **(gpu if flavour != "cpu" else {})}.items():
            assert p.get(name.lower()) == version, f"{flavour}: {name}"


def test_preflight_flavours_match_the_lock_inputs():
    from ft.sizing import preflight

    assert set(preflight.DRIVER_FLOOR) == {"cu130", "cu128"}
    assert "torch==2.13.0" in (ROOT / "env/cu130.in").read_text()
    assert "torch==2.10.0" in (ROOT / "env/cu128.in").read_text()


def test_repository_files_carry_no_machine_paths():
    value = os.environ.get("PIP_FIND_LINKS")
    if not value:
        pytest.skip("PIP_FIND_LINKS is not set here")
    files = [ROOT / p for p in ("Dockerfile", "compose.yaml", ".dockerignore", "noxfile.py", ".ci/run")]
    files += list((ROOT / "env").glob("*"))
    for f in files:
        if f.is_file():
            for link in value.split():
                assert link not in f.read_text(), f"{f.name} names this machine's wheel folder"


# -- env/image.py helpers (no engine needed) ----------------------------------------------------------------
def test_local_wheels_found_and_hash_checked(tmp_path, monkeypatch):
    image = load_env_module("image")
    links = tmp_path / "links"
    links.mkdir()
    wheel = links / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(b"not really a wheel")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    lock = tmp_path / "cpu.txt"
    lock.write_text(
        f"numpy==2.4.6 \\\n    --hash=sha256:{'1' * 64}\ntorch==2.13.0+cpu \\\n    --hash=sha256:{digest}\n"
    )
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    assert image.local_wheels(lock) == [wheel]
    lock.write_text(f"torch==2.13.0+cpu \\\n    --hash=sha256:{'2' * 64}\n")
    with pytest.raises(image.Failure, match="sha256 is not among"):
        image.local_wheels(lock)
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    with pytest.raises(image.Failure, match="PIP_FIND_LINKS"):
        image.local_wheels(lock)


def test_pip_config_is_read_without_pip(tmp_path, monkeypatch):
    image = load_env_module("image")
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = https://mirror.invalid/simple\ncert = /x/ca.pem\n")
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    assert image._pip_config("index-url") == "https://mirror.invalid/simple"
    monkeypatch.setenv("PIP_INDEX_URL", "https://env.invalid/simple")
    assert image.index_url() == "https://env.invalid/simple"
    monkeypatch.setenv("PIP_INDEX_URL", "file:///local/simple")
    assert image.index_url() is None  # a build cannot see this machine's files


def test_image_helper_parses_its_commands():
    image = load_env_module("image")
    with pytest.raises(SystemExit):
        image.main(["--help"])
    assert image.FLAVOURS[0] == image.DEFAULT_FLAVOUR == "cu130"


def test_python_of_the_image_matches_the_lock_target():
    # Debian 12's python3 is 3.11; the locks are resolved for it (noxfile LOCK_TARGET).
    assert '--python-version", "3.11"' in (ROOT / "noxfile.py").read_text()
    assert sys.version_info[:2] >= (3, 10)
