"""Build, test and use ft's image: the helper behind `nox -s build | image_smoke | export | rerun`.

    python env/image.py build [--flavour cu130] [--base REF] [--tag ft:cu130]
    python env/image.py smoke [--warm-rebuild]       # CI: engine, debootstrapped base, CPU image, compose run
    python env/image.py export [BUNDLE] [--from DIR | --volume NAME] [--to DIR]   # default build/export
    python env/image.py rerun BUNDLE [--gpus auto|all|none] [--work DIR]       # default build/rerun

Run from the repository root in a nox session that has the `docker` SDK and ft installed. The SDK talks
to the engine (ping, images, labels, containers, `docker save`); the build itself goes through the
docker CLI because only BuildKit does build secrets and cache mounts, and the SDK drives the legacy
builder. Nothing machine-specific is written into the repository: the CA bundle, the package index, the
local wheel folder and the Debian mirror are all looked up at run time.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import ssl
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
FLAVOURS = ("cu130", "cu128", "cpu")
DEFAULT_FLAVOUR = "cu130"
BASE_TAG = "ft-base:bookworm"
TIMINGS: dict[str, float] = {}


class Failure(Exception):
    """A problem the person running the session can act on; printed as one paragraph."""


def log(msg: str) -> None:
    print(f"[image] {msg}", flush=True)


@contextlib.contextmanager
def timed(name: str):
    start = time.monotonic()
    try:
        yield
    finally:
        TIMINGS[name] = round(time.monotonic() - start, 1)
        log(f"{name}: {TIMINGS[name]} s")


def run(cmd: list[str], *, check: bool = True, capture: bool = False, env: dict | None = None, **kw):
    shown = " ".join(cmd)
    log(f"$ {shown}")
    proc = subprocess.run(cmd, text=True, capture_output=capture, env=env, **kw)
    if check and proc.returncode != 0:
        detail = f"\n{proc.stderr or ''}{proc.stdout or ''}" if capture else ""
        raise Failure(
            f"`{cmd[0]} {cmd[1] if len(cmd) > 1 else ''}` failed with exit code {proc.returncode}{detail}"
        )
    return proc


# -- the machine's settings, read at run time -----------------------------------------------------------
def _pip_config(key: str) -> str | None:
    """A pip setting as pip here sees it: PIP_<KEY> in the environment, else pip's config files.

    Read with configparser rather than `pip config`, because a nox virtualenv made by uv has no pip.
    Later files win, as in pip: site-wide, then the user's, then the one PIP_CONFIG_FILE names.
    """
    env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
    if env:
        return env
    import configparser

    home = Path.home()
    files = [
        Path("/etc/pip.conf"),
        Path("/etc/xdg/pip/pip.conf"),
        home / ".pip/pip.conf",
        Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config") / "pip/pip.conf",
    ]
    if os.environ.get("VIRTUAL_ENV"):
        files.append(Path(os.environ["VIRTUAL_ENV"]) / "pip.conf")
    if os.environ.get("PIP_CONFIG_FILE"):
        files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    value = None
    for f in files:
        cp = configparser.ConfigParser()
        with contextlib.suppress(OSError, configparser.Error):
            cp.read(f)
            for section in ("global", "install"):
                if cp.has_option(section, key):
                    value = cp.get(section, key).strip() or value
    return value


def ca_bundle() -> Path | None:
    """The CA bundle this machine trusts, for pip inside the build (TLS-inspecting networks need it)."""
    candidates = [os.environ.get(k) for k in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")]
    candidates += [
        _pip_config("cert"),
        ssl.get_default_verify_paths().cafile,
        "/etc/ssl/certs/ca-certificates.crt",
    ]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


def index_url() -> str | None:
    """The package index pip here uses, if not pip's default. A file:// index cannot be seen from a build."""
    url = _pip_config("index-url")
    return url if url and not url.startswith("file:") else None


def find_links_dirs() -> list[Path]:
    value = os.environ.get("PIP_FIND_LINKS") or _pip_config("find-links") or ""
    return [Path(p) for p in value.split() if Path(p).is_dir()]


def debian_mirrors() -> tuple[str, str | None]:
    """(main mirror, security mirror) from this machine's apt sources; FT_DEBIAN_MIRROR overrides."""
    if os.environ.get("FT_DEBIAN_MIRROR"):
        return os.environ["FT_DEBIAN_MIRROR"], os.environ.get("FT_DEBIAN_SECURITY_MIRROR")
    entries: list[tuple[str, list[str]]] = []
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for f in files:
        if not f.is_file() or not (f.suffix in (".list", ".sources") or f.name == "sources.list"):
            continue
        text = f.read_text(errors="replace")
        if f.suffix == ".sources":  # deb822 stanzas
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, flags=re.M))
                if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                    for uri in fields.get("URIs", "").split():
                        entries.append((uri, fields.get("Suites", "").split()))
        else:
            for line in text.splitlines():
                parts = re.sub(r"\[[^]]*\]", "", line).split()
                if len(parts) >= 3 and parts[0] == "deb":
                    entries.append((parts[1], [parts[2]]))
    main = next((u for u, s in entries if "bookworm" in s), None)
    security = next((u for u, s in entries if "bookworm-security" in s), None)
    if not main:
        raise Failure(
            "No Debian bookworm mirror in /etc/apt/sources.list(.d): set FT_DEBIAN_MIRROR to one "
            "(and FT_DEBIAN_SECURITY_MIRROR for security updates) to debootstrap the test base."
        )
    return main.rstrip("/"), security.rstrip("/") if security else None


def git_commit(root: Path = ROOT) -> str:
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def ft_version(root: Path = ROOT) -> str:
    m = re.search(r'^version\s*=\s*"([^"]+)"', (root / "pyproject.toml").read_text(), flags=re.M)
    return m.group(1) if m else "unknown"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- tools and the engine -------------------------------------------------------------------------------
APT_PACKAGES = ("docker.io", "docker-compose", "debootstrap")


def ensure_tools(need: tuple[str, ...] = ("dockerd", "docker-compose", "debootstrap")) -> None:
    """Install Debian's engine, compose and debootstrap in CI; elsewhere say how."""
    missing = [t for t in need if not shutil.which(t)]
    if not missing:
        return
    command = "apt-get update && apt-get install -y " + " ".join(APT_PACKAGES)
    if os.geteuid() == 0 and os.environ.get("CI"):
        log(f"installing {', '.join(APT_PACKAGES)} (missing: {', '.join(missing)})")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-q"], env=env)
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES], env=env)
        return
    raise Failure(f"Missing {', '.join(missing)}. Install them with `{command}` (as root), then run again.")


def docker_cli() -> str:
    """A docker client that can build with BuildKit.

    Docker CLIs from 23 on hand BuildKit builds to the buildx plugin; Debian's 20.10 CLI does them
    itself. A machine can have both (a newer static client first in PATH without buildx), so try each
    `docker` on PATH and take the first that can.
    """
    seen: list[str] = []
    for d in os.environ.get("PATH", "").split(os.pathsep):
        cand = Path(d) / "docker"
        if cand.is_file() and os.access(cand, os.X_OK) and str(cand.resolve()) not in seen:
            seen.append(str(cand.resolve()))
    for cli in seen:
        if subprocess.run([cli, "buildx", "version"], capture_output=True).returncode == 0:
            return cli
    for cli in seen:
        out = subprocess.run([cli, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"version (\d+)\.", out)
        if m and int(m.group(1)) < 23:
            return cli
    raise Failure(
        "No docker client here can build with BuildKit (needed for build secrets and cache mounts): "
        "install the buildx plugin (`docker-buildx`) or Debian's `docker.io`."
    )


def compose_cmd() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    cli = shutil.which("docker")
    if cli and subprocess.run([cli, "compose", "version"], capture_output=True).returncode == 0:
        return [cli, "compose"]
    raise Failure("Neither `docker-compose` nor `docker compose` is installed.")


def client():
    import docker

    return docker.from_env(timeout=600)


def engine_up() -> bool:
    try:
        return bool(client().ping())
    except Exception:
        return False


class Engine:
    """Use the running Docker engine, or start dockerd for the duration and stop exactly that process."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Engine:
        if engine_up():
            log("using the running Docker engine")
            return self
        if os.geteuid() != 0:
            raise Failure(
                "No Docker engine is running and only root can start one: start Docker, then run again."
            )
        ensure_tools(("dockerd",))
        BUILD.mkdir(exist_ok=True)
        # Builds use the host network and test containers none, so dockerd needs no NAT rules; without
        # --iptables=false it fails on machines whose kernel lacks the iptables modules.
        for extra in ([], ["--storage-driver", "vfs"]):
            logfile = open(BUILD / "dockerd.log", "a")  # noqa: SIM115 - lives as long as the daemon
            cmd = ["dockerd", "--iptables=false", "--ip-masq=false", *extra]
            log("starting " + " ".join(cmd) + f" (log: {(BUILD / 'dockerd.log').relative_to(ROOT)})")
            self.proc = subprocess.Popen(
                cmd, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True
            )
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.proc.poll() is None:
                if engine_up():
                    return self
                time.sleep(0.5)
            self._stop()
            log("dockerd did not come up" + ("; retrying with the vfs storage driver" if not extra else ""))
        raise Failure(f"dockerd would not start; see {BUILD / 'dockerd.log'}")

    def _stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()  # dockerd stops its containers and its own containerd on SIGTERM
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        log(f"stopped dockerd (pid {self.proc.pid})")
        self.proc = None

    def __exit__(self, *exc) -> None:
        self._stop()


# -- the base: the real one is pulled; the test one is debootstrapped -------------------------------------
def pinned_base() -> str:
    lines = [ln.strip() for ln in (ROOT / "env" / "base-image.txt").read_text().splitlines()]
    return next(ln for ln in lines if ln and not ln.startswith("#"))


def ensure_pulled(ref: str) -> None:
    import docker

    c = client()
    try:
        c.images.get(ref)
        return
    except docker.errors.ImageNotFound:
        pass
    log(f"pulling {ref}")
    try:
        c.images.pull(ref)
    except docker.errors.APIError as exc:
        raise Failure(
            f"Cannot pull the base image {ref}: {exc.explanation or exc}. This machine cannot reach the "
            "registry. Pull it where you can and `docker save | docker load` it here, or pass another base "
            "with --base (any Debian bookworm, e.g. one made by `debootstrap`; `nox -s image_smoke` shows how)."
        ) from None


def cache_dir() -> Path:
    d = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ft"
    d.mkdir(parents=True, exist_ok=True)
    return d


def ensure_debootstrap_base(tag: str = BASE_TAG, refresh: bool = False) -> str:
    """A Debian bookworm base made locally: the same distribution as the real, pinned base.

    Reused when the engine has it; else re-imported from the cached tarball; else debootstrapped
    (about a minute) and cached under ~/.cache/ft for the next run.
    """
    import docker

    c = client()
    if not refresh:
        try:
            return c.images.get(tag).id
        except docker.errors.ImageNotFound:
            pass
    tarball = cache_dir() / "base-bookworm-minbase.tar"
    if refresh or not tarball.is_file():
        ensure_tools(("debootstrap",))
        main, security = debian_mirrors()
        with tempfile.TemporaryDirectory(prefix="ft-rootfs-") as tmp, timed("debootstrap"):
            rootfs = Path(tmp) / "rootfs"
            run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), main])
            _slim_like(rootfs, main, security)
            partial = tarball.with_suffix(".partial")
            run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."])
            partial.replace(tarball)
    with timed("base import"):
        run([docker_cli(), "import", "--change", 'CMD ["bash"]', str(tarball), tag])
    return c.images.get(tag).id


def _slim_like(rootfs: Path, main: str, security: str | None) -> None:
    """Make the debootstrapped tree look like the slim image: same apt sources, no host leftovers."""
    suites = [("bookworm bookworm-updates", main)] + ([("bookworm-security", security)] if security else [])
    sources = "\n".join(
        f"Types: deb\nURIs: {uri}\nSuites: {s}\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        for s, uri in suites
    )
    (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(sources)
    (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
    for leftover in ("etc/resolv.conf", "etc/hostname", "etc/hosts"):
        (rootfs / leftover).unlink(missing_ok=True)
    for d in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (rootfs / d).glob("*"):
            if p.is_file():
                p.unlink()


# -- build context and build ----------------------------------------------------------------------------
def lock_path(flavour: str, root: Path = ROOT) -> Path:
    path = root / "lockfiles" / f"{flavour}.txt"
    if not path.is_file():
        raise Failure(f"{path.relative_to(root)} is missing: run `nox -s lock` first")
    return path


def local_wheels(lock: Path) -> list[Path]:
    """Wheels a lock pins with a local version (e.g. torch==2.13.0+cpu) from the find-links folders.

    No index has them, so they travel in the build context; their hashes must be in the lock.
    """
    wanted = re.findall(r"^([A-Za-z0-9_.-]+)==([^\s\\]+\+[^\s\\]+)", lock.read_text(), flags=re.M)
    found = []
    for name, version in wanted:
        stem = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"
        matches = [
            w for d in find_links_dirs() for w in d.glob("*.whl") if w.name.lower().startswith(stem.lower())
        ]
        if not matches:
            raise Failure(
                f"{lock.name} pins {name}=={version}, which no package index has: put its wheel in a folder "
                "named by PIP_FIND_LINKS (pip's find-links setting)."
            )
        for w in matches:
            if sha256_file(w) not in lock.read_text():
                raise Failure(f"{w.name}: its sha256 is not among the hashes {lock.name} pins for {name}")
        found += matches
    return found


def make_context(dest: Path, flavour: str, source: Path = ROOT) -> Path:
    """A clean build context: the project's files (as git sees them) plus the wheels the lock needs."""
    files: list[str]
    try:
        out = subprocess.run(
            ["git", "-C", str(source), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            check=True,
        ).stdout.decode()
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", ".nox", "build", "runs", "bundles", "__pycache__", ".ci-venv"}
        files = [
            str(p.relative_to(source)) for p in source.rglob("*") if p.is_file() and not skip & set(p.parts)
        ]
    for rel in files:
        src = source / rel
        if src.is_file() and (not rel.startswith("env/wheels/") or rel == "env/wheels/.gitignore"):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "env" / "wheels").mkdir(parents=True, exist_ok=True)
    for wheel in local_wheels(lock_path(flavour, dest)):
        shutil.copy2(wheel, dest / "env" / "wheels" / wheel.name)
    return dest


def build(
    context: Path, *, flavour: str, tag: str, base: str | None, commit: str, extra_env: dict | None = None
) -> str:
    """Build the Dockerfile in `context` with BuildKit; return the image id."""
    lock = lock_path(flavour, context)
    args = {
        "FLAVOUR": flavour,
        "GIT_COMMIT": commit,
        "BUILD_TIME": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "FT_VERSION": ft_version(context),
        "LOCK_SHA256": sha256_file(lock),
    }
    if base:
        args["BASE_IMAGE"] = base
    cmd = [docker_cli(), "build", "--network", "host", "--progress", "plain", "--tag", tag]
    for k, v in args.items():
        cmd += ["--build-arg", f"{k}={v}"]
    with tempfile.TemporaryDirectory(prefix="ft-secrets-") as tmp:
        if ca := ca_bundle():
            cmd += ["--secret", f"id=ca,src={ca}"]
        if url := index_url():
            secret = Path(tmp) / "index_url"
            secret.write_text(url)
            cmd += ["--secret", f"id=index_url,src={secret}"]
        env = {**os.environ, "DOCKER_BUILDKIT": "1", **(extra_env or {})}
        run([*cmd, str(context)], env=env)
    image = client().images.get(tag)
    log(f"built {tag}: {image.id}")
    return image.id


def record(image_id: str, tag: str, flavour: str, base: str | None, out: Path) -> dict:
    labels = client().images.get(image_id).labels or {}
    facts = {"id": image_id, "tag": tag, "flavour": flavour, "base_image": base, "labels": labels}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n")
    log(f"recorded {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return facts


# -- commands -------------------------------------------------------------------------------------------
def cmd_build(a) -> int:
    """The real image: the digest-pinned base (or --base), the flavour's lock, the checkout's source."""
    base = a.base or pinned_base()
    tag = a.tag or f"ft:{a.flavour}"
    with Engine():
        ensure_pulled(base)
        with tempfile.TemporaryDirectory(prefix="ft-context-") as tmp, timed("build"):
            image_id = build(
                make_context(Path(tmp), a.flavour), flavour=a.flavour, tag=tag, base=base, commit=git_commit()
            )
        record(image_id, tag, a.flavour, base, BUILD / "image.json")
    print(image_id)
    return 0


def _invoking_ids() -> tuple[int, int]:
    """The uid:gid the containers run as: the caller's, or 1000:1000 when the caller is root."""
    uid, gid = os.getuid(), os.getgid()
    return (uid, gid) if uid != 0 else (1000, 1000)


def _scan_for(token: bytes, root: Path) -> list[str]:
    """Every file under root (and every member of its archives) that contains token."""
    hits = []
    for p in root.rglob("*"):
        if not p.is_file():
            continue
        if token in p.read_bytes():
            hits.append(str(p))
        if p.name.endswith((".tar.gz", ".tgz", ".tar")):
            with tarfile.open(p) as tar:
                for m in tar:
                    f = tar.extractfile(m) if m.isfile() else None
                    if f and token in f.read():
                        hits.append(f"{p}:{m.name}")
    return hits


def _image_contains(image_id: str, token: bytes) -> list[str]:
    """Where token appears in the image: its saved layers (`docker save`), history or config."""
    img = client().images.get(image_id)
    where = []
    tail = b""
    for chunk in img.save(named=False):
        if token in tail + chunk:
            where.append("docker save (a layer or the config)")
            break
        tail = chunk[-len(token) :]
    if token.decode() in json.dumps(img.history()):
        where.append("docker history")
    if token.decode() in json.dumps(img.attrs):
        where.append("docker inspect")
    return where


def cmd_smoke(a) -> int:
    """CI: build the CPU image on a debootstrapped base and run the tiny loop in it with compose.

    build/image-smoke.json records every phase's seconds, the image's size and the tools' versions,
    and is written on failure too (with "passed": false and the failure), so a red CI run says where.
    """
    # What this machine lacks: an engine (unless one runs), a compose (v1 or v2). debootstrap is asked
    # for only when no base is cached (ensure_debootstrap_base).
    need = [] if engine_up() else ["dockerd"]
    try:
        compose_cmd()
    except Failure:
        need.append("docker-compose")
    ensure_tools(tuple(need))
    flavour, tag = "cpu", "ft:cpu"
    token = "hf_FAKE" + secrets.token_hex(16)  # planted; must show up nowhere
    summary: dict = {"image": tag, "passed": False}
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            with timed("engine start"):
                stack.enter_context(Engine())
            summary["versions"] = _tool_versions()
            base = ensure_debootstrap_base(refresh=a.refresh_base)
            made = (
                "debootstrap"
                if "debootstrap" in TIMINGS
                else "cached tarball"
                if "base import" in TIMINGS
                else "engine"
            )
            summary["base"] = {"tag": BASE_TAG, "id": base, "from": made}
            with tempfile.TemporaryDirectory(prefix="ft-context-") as tmp:
                ctx = make_context(Path(tmp), flavour)
                build_env = {"HF_TOKEN": token}  # a token in the builder's environment must not reach a layer
                with timed("image build"):
                    image_id = build(
                        ctx, flavour=flavour, tag=tag, base=BASE_TAG, commit=git_commit(), extra_env=build_env
                    )
                if a.warm_rebuild:
                    with timed("image build (warm)"):
                        image_id = build(
                            ctx,
                            flavour=flavour,
                            tag=tag,
                            base=BASE_TAG,
                            commit=git_commit(),
                            extra_env=build_env,
                        )
            summary["id"] = image_id
            summary["size_bytes"] = client().images.get(image_id).attrs.get("Size")
            summary["size_mb"] = round((summary["size_bytes"] or 0) / 1e6)
            record(image_id, tag, flavour, base, BUILD / "image-cpu.json")
            with timed("image checks"):
                _check_image(image_id)
                # The test suite's `docker`-marked tests, against this image while the engine is up.
                test_env = {**os.environ, "FT_TEST_IMAGE": image_id, "HF_HUB_OFFLINE": "1"}
                pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "docker"]
                run([*pytest, "tests/test_container.py"], env=test_env, cwd=ROOT)

            work = BUILD / "image-smoke"
            if work.exists():
                shutil.rmtree(work)
            uid, gid = _invoking_ids()
            for d in ("data", "runs", "bundles"):
                (work / d).mkdir(parents=True)
                os.chown(work / d, uid, gid)
            env = {
                **os.environ,
                "UID": str(uid),
                "GID": str(gid),
                "FT_FLAVOUR": flavour,
                "FT_IMAGE_ID": image_id,
                "HF_TOKEN": token,
            }
            env.pop("FT_RECIPE", None)
            project = ["-f", str(ROOT / "compose.yaml"), "--project-directory", str(work), "-p", "ftsmoke"]
            try:
                with timed("container smoke"):
                    run([*compose_cmd(), *project, "run", "--rm", "-T", "smoke"], env=env)
                # Issue 10: the image exports what it trained (merged, GGUF f16/q8_0/q4_k_m, Modelfile),
                # each loaded back and scored, with no network, through compose's `export` service.
                smoke_archives = sorted((work / "bundles").glob("*.tar.gz"))
                if smoke_archives:
                    with timed("container export"):
                        bundle_arg = f"bundles/{smoke_archives[-1].name}"
                        run(
                            [
                                *compose_cmd(),
                                *project,
                                "run",
                                "--rm",
                                "-T",
                                "export",
                                bundle_arg,
                                "--to",
                                "all",
                            ],
                            env=env,
                        )
            finally:
                with contextlib.suppress(Exception):  # the named cache volume of this throwaway project
                    run([*compose_cmd(), *project, "down", "--volumes"], env=env, capture=True)
            with timed("host checks"):
                summary.update(_check_outputs(work, uid, image_id, token.encode()))
                leaks = _image_contains(image_id, token.encode())
                if leaks:
                    raise Failure(f"the planted token is in the image: {', '.join(leaks)}")
                summary["token_in_image"] = False
        summary["passed"] = True
    except Failure as exc:
        summary["failure"] = str(exc)
        raise
    finally:
        TIMINGS["total"] = round(time.monotonic() - started, 1)
        summary["timings_s"] = TIMINGS
        summary["cpus"] = os.cpu_count()
        summary["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        BUILD.mkdir(exist_ok=True)
        (BUILD / "image-smoke.json").write_text(json.dumps(summary, indent=2) + "\n")
    log("image smoke passed: " + json.dumps(TIMINGS))
    return 0


def _tool_versions() -> dict:
    """The engine's, compose's and debootstrap's versions, for the record."""
    versions = {}
    with contextlib.suppress(Exception):
        v = client().version()
        versions["docker engine"] = f"{v.get('Version')} (API {v.get('ApiVersion')})"
    with contextlib.suppress(Exception):
        versions["compose"] = run([*compose_cmd(), "version", "--short"], capture=True).stdout.strip()
    with contextlib.suppress(Exception):
        out = run(["dpkg-query", "-W", "-f", "${Version}", "debootstrap"], capture=True).stdout
        versions["debootstrap"] = out.strip()
    return versions


def _check_image(image_id: str) -> None:
    """The image runs as non-root, `ft --help` answers, and `ft env` names the image's facts."""
    c = client()
    user = c.images.get(image_id).attrs["Config"].get("User")
    if not user or user in ("0", "root"):
        raise Failure(f"the image runs as {user or 'root'}; it must run as a non-root user")
    c.containers.run(image_id, ["--help"], remove=True, network_disabled=True)
    out = c.containers.run(
        image_id,
        ["env", "--short"],
        remove=True,
        network_disabled=True,
        environment={"FT_IMAGE_ID": image_id},
    ).decode()
    log("ft env --short in the container:\n" + out)


def _check_outputs(work: Path, uid: int, image_id: str, token: bytes) -> dict:
    """What the container left on the host: a bundle that verifies here, owned by uid, naming the image."""
    archives = sorted((work / "bundles").glob("*.tar.gz"))
    if not archives:
        raise Failure(f"the smoke run left no bundle archive in {work / 'bundles'}")
    for target in (archives[-1], Path(str(archives[-1]).removesuffix(".tar.gz"))):
        run([sys.executable, "-m", "ft", "verify", str(target)])
    export = work / "bundles" / "exports" / archives[-1].name.removesuffix(".tar.gz")
    if not (export / "export" / "report.json").is_file():
        raise Failure(f"the container's `ft export` left no sealed export in {export}")
    run([sys.executable, "-m", "ft", "verify", str(export)])
    wrong = [str(p) for d in ("runs", "bundles") for p in (work / d).rglob("*") if p.lstat().st_uid != uid]
    if wrong:
        raise Failure(f"files not owned by uid {uid}: {wrong[:5]}")
    hits = _scan_for(token, work)
    if hits:
        raise Failure(f"the planted token was written to: {hits[:5]}")
    envs = sorted((work / "runs").rglob("env.json"))
    if not envs:
        raise Failure("no env.json in the run directory")
    manifest = json.loads(envs[0].read_text())
    image = manifest.get("image") or {}
    problems = []
    if image.get("id") != image_id:
        problems.append(f"image.id is {image.get('id')!r}, not {image_id}")
    if not (manifest.get("lockfile") or {}).get("sha256"):
        problems.append("no lockfile sha256")
    if not (manifest.get("git_commit") or image.get("git_commit")):
        problems.append("no git commit")
    if problems:
        raise Failure(f"{envs[0].relative_to(work)} does not name the image: {'; '.join(problems)}")
    return {
        "bundle": archives[-1].name,
        "owner_uid": uid,
        "token_in_outputs": False,
        "manifest_image": {k: image.get(k) for k in ("id", "flavour", "lockfile_sha256", "git_commit")},
    }


def _open_bundle(path: Path, stack: contextlib.ExitStack) -> Path:
    """A bundle directory for `path` (a directory, or an archive unpacked to a temporary one)."""
    if path.is_dir():
        return path
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ft-bundle-")))
    with tarfile.open(path) as tar:
        tar.extractall(tmp, filter="data")
    dirs = [p for p in tmp.iterdir() if p.is_dir()]
    return dirs[0] if len(dirs) == 1 and not any(p.is_file() for p in tmp.iterdir()) else tmp


def _bundle_env(bundle_dir: Path) -> dict:
    found = sorted(bundle_dir.rglob("env.json"), key=lambda p: len(p.parts))
    if not found:
        raise Failure(f"{bundle_dir}: no env.json in this bundle, so it names no image")
    return json.loads(found[0].read_text())


def cmd_export(a) -> int:
    """Copy a sealed bundle out of ./bundles (or a Docker volume) and verify the copy on the host."""
    dest = Path(a.to).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    if a.volume:
        with Engine():
            copied = _copy_from_volume(a.volume, a.bundle, dest)
    else:
        src = Path(a.source)
        candidates = (
            [src / a.bundle] if a.bundle else sorted(src.glob("*.tar.gz"), key=lambda p: p.stat().st_mtime)
        )
        if not candidates or not candidates[-1].exists():
            raise Failure(f"no bundle {'named ' + a.bundle if a.bundle else 'archive'} in {src}")
        chosen = candidates[-1]
        copied = dest / chosen.name
        (
            shutil.copytree(chosen, copied, dirs_exist_ok=True)
            if chosen.is_dir()
            else shutil.copy2(chosen, copied)
        )
    run([sys.executable, "-m", "ft", "verify", str(copied)])
    log(f"exported and verified: {copied}")
    return 0


def _copy_from_volume(volume: str, name: str | None, dest: Path) -> Path:
    """Read a bundle out of a named volume through a stopped container (nothing runs, no network)."""
    import io

    c = client()
    images = [i for i in c.images.list() if any(t.startswith("ft:") for t in i.tags)]
    if not images:
        raise Failure("no ft image here to open the volume with: build one first (`nox -s build`)")
    box = c.containers.create(images[0].id, ["--help"], volumes={volume: {"bind": "/v", "mode": "ro"}})
    try:
        if not name:
            listing, _ = box.get_archive("/v")
            with tarfile.open(fileobj=io.BytesIO(b"".join(listing))) as tar:
                names = sorted(
                    m.name.split("/", 1)[1] for m in tar if m.name.endswith(".tar.gz") and "/" in m.name
                )
            if not names:
                raise Failure(f"no bundle archive in volume {volume}")
            name = names[-1]
        stream, _ = box.get_archive(f"/v/{name}")
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            tar.extractall(dest, filter="data")
    finally:
        box.remove()
    return dest / Path(name).name


def cmd_rerun(a) -> int:
    """Re-run a bundle's recipe in the image its env.json names: reused if present, else rebuilt."""
    bundle = Path(a.bundle).resolve()
    with contextlib.ExitStack() as stack:
        bundle_dir = _open_bundle(bundle, stack)
        env = _bundle_env(bundle_dir)
        stack.enter_context(Engine())
        image_id = _find_or_rebuild(env.get("image") or {}, env)
        flavour = (env.get("image") or {}).get("flavour") or "cpu"
        work = Path(a.work).resolve()
        work.mkdir(parents=True, exist_ok=True)
        uid, gid = _invoking_ids()
        os.chown(work, uid, gid)
        gpus = a.gpus if a.gpus != "auto" else ("none" if flavour == "cpu" else "all")
        kwargs = {}
        if gpus == "all":
            import docker

            kwargs["device_requests"] = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
        target = "/workspace/bundle" + ("" if bundle.is_dir() else "/" + bundle.name)
        mount_src = bundle if bundle.is_dir() else bundle.parent
        log(f"ft reproduce in {image_id[:19]} ({'GPU' if gpus == 'all' else 'CPU'})")
        box = client().containers.run(
            image_id,
            ["reproduce", target, "--work", "/workspace/out"],
            detach=True,
            user=f"{uid}:{gid}",
            volumes={
                str(mount_src): {"bind": "/workspace/bundle", "mode": "ro"},
                str(work): {"bind": "/workspace/out", "mode": "rw"},
                "ft-rerun-cache": {"bind": "/cache", "mode": "rw"},
            },
            environment={"FT_IMAGE_ID": image_id, "HF_TOKEN": os.environ.get("HF_TOKEN", "")},
            init=True,
            **kwargs,
        )
        for line in box.logs(stream=True, follow=True):
            sys.stdout.write(line.decode(errors="replace"))
        code = box.wait()["StatusCode"]
        box.remove()
    log(f"ft reproduce exited {code}; outputs in {work}")
    return code


def _find_or_rebuild(image: dict, env: dict) -> str:
    import docker

    c = client()
    if image.get("id"):
        try:
            found = c.images.get(image["id"]).id
            log(f"reusing the bundle's image {found}")
            return found
        except docker.errors.ImageNotFound:
            pass
    want = {"ft.lockfile.sha256": image.get("lockfile_sha256"), "ft.git.commit": image.get("git_commit")}
    if all(want.values()):
        for img in c.images.list(filters={"label": [f"{k}={v}" for k, v in want.items()]}):
            log(f"reusing an image with the same lock and commit: {img.id}")
            return img.id
    commit = image.get("git_commit") or env.get("git_commit") or ""
    flavour = image.get("flavour") or "cpu"
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise Failure(
            f"the bundle's image is not here and its commit ({commit or 'unknown'}) cannot be rebuilt exactly "
            "(a dirty or unknown tree). Build the image that made it, then run again."
        )
    log(f"rebuilding the image from commit {commit[:12]} (flavour {flavour})")
    with tempfile.TemporaryDirectory(prefix="ft-rerun-") as tmp:
        ctx = Path(tmp)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", commit], capture_output=True
        )
        if archive.returncode != 0:
            raise Failure(f"commit {commit} is not in this checkout: fetch it, then run again")
        subprocess.run(["tar", "-x", "-C", str(ctx)], input=archive.stdout, check=True)
        (ctx / "env" / "wheels").mkdir(parents=True, exist_ok=True)
        for wheel in local_wheels(lock_path(flavour, ctx)):
            shutil.copy2(wheel, ctx / "env" / "wheels" / wheel.name)
        base = image.get("base_image") or None
        if base and base != BASE_TAG:
            ensure_pulled(base)
        new = build(ctx, flavour=flavour, tag=f"ft:rerun-{commit[:12]}", base=base, commit=commit)
    got = c.images.get(new).labels.get("ft.lockfile.sha256")
    if image.get("lockfile_sha256") and got != image["lockfile_sha256"]:
        raise Failure(
            f"the rebuilt image's lock ({got}) differs from the bundle's ({image['lockfile_sha256']})"
        )
    return new


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="env/image.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the real image")
    b.add_argument("--flavour", choices=FLAVOURS, default=os.environ.get("FT_FLAVOUR", DEFAULT_FLAVOUR))
    b.add_argument("--base", help="base image (default: the digest pin in env/base-image.txt)")
    b.add_argument("--tag", help="image tag (default ft:FLAVOUR, what compose.yaml runs)")
    b.set_defaults(func=cmd_build)
    s = sub.add_parser("smoke", help="CI: CPU image on a debootstrapped base, tiny loop through compose")
    s.add_argument("--warm-rebuild", action="store_true", help="build a second time to time the warm cache")
    s.add_argument("--refresh-base", action="store_true", help="debootstrap the base again")
    s.set_defaults(func=cmd_smoke)
    e = sub.add_parser("export", help="copy a sealed bundle out and verify it")
    e.add_argument("bundle", nargs="?", help="bundle name (default: the newest archive)")
    e.add_argument("--from", dest="source", default="bundles", help="bundle folder (default ./bundles)")
    e.add_argument("--volume", help="read from this Docker volume instead of a folder")
    e.add_argument("--to", default="build/export", help="destination (default build/export, git-ignored)")
    e.set_defaults(func=cmd_export)
    r = sub.add_parser("rerun", help="re-run a bundle's recipe in the image it names")
    r.add_argument("bundle")
    r.add_argument("--gpus", choices=("auto", "all", "none"), default="auto")
    r.add_argument(
        "--work", default="build/rerun", help="where the re-run writes (default build/rerun, git-ignored)"
    )
    r.set_defaults(func=cmd_rerun)
    a = p.parse_args(argv)
    try:
        return a.func(a)
    except Failure as exc:
        print(f"\nimage: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
