"""Seal a finished run into a bundle, and verify a bundle someone handed you.

A bundle is a directory (and a deterministic .tar.gz of it) whose MANIFEST.json lists every file's
path, sha256 and size; anyone can recompute it with `sha256sum`, and `ft verify` does so and names the
first file that changed, went missing or appeared. The manifest is written last, so a directory without
one is not a bundle. An optional Ed25519 signature over the manifest's bytes (MANIFEST.json.sig, see
`ft.bundle.signing`) vouches for who sealed it. Bundles hold no pickles: loading a pickle runs code, so
weights and state travel as safetensors or JSON and anything else is refused at both ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import struct
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from ft.bundle import signing
from ft.bundle.archive import safe_extract, write_tar_gz
from ft.errors import FtError
from ft.fsutil import CHUNK, atomic_dir, dumps_json, sha256_file, write_bytes, write_text

FORMAT = "ft-bundle/1"
MANIFEST = "MANIFEST.json"
SIGNATURE = MANIFEST + signing.SIG_SUFFIX
DEFAULT_OUT_DIR = Path("bundles")  # same default as recipe `output.bundle_dir`
REQUIRED = ("run.json", "recipe.resolved.yaml", "env.json", "data.json", "eval/report.json")
OPTIONAL = ("metrics.jsonl", "decision.md")
BUNDLED_DIRS = ("adapter", "eval")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
# What `docker compose` runs to rerun a bundle inside the project's image; {archive} is the bundle.
COMPOSE_REPRODUCE = "docker compose run --rm train ft reproduce {archive}"
_HEX = set("0123456789abcdef")


# ---------------------------------------------------------------- pickles


def _is_safetensors(path: Path, size: int) -> bool:
    """A safetensors file: u64 little-endian header length, then that many bytes of a JSON object."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return False
        (n,) = struct.unpack("<Q", head)
        if n < 2 or 8 + n > size or n > 100 * 2**20:
            return False
        try:
            return isinstance(json.loads(f.read(n)), dict)
        except ValueError:
            return False


def pickle_problem(path: Path) -> str | None:
    """Why `path` looks like a pickle (by name, protocol header or torch.save zip), or None."""
    if path.name.lower().endswith(PICKLE_SUFFIXES):
        return f"'{path.suffix}' files are pickles; save weights as safetensors and state as JSON"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    # Pickle protocols 2-5 start with the PROTO opcode 0x80 and the protocol number.
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and not _is_safetensors(path, size):
        return f"starts with a pickle protocol {head[1]} header"
    if head == b"PK\x03\x04":
        with contextlib.suppress(zipfile.BadZipFile, OSError):
            with zipfile.ZipFile(path) as z:
                inner = [n for n in z.namelist() if n.lower().endswith((".pkl", ".pickle"))]
            if inner:
                return f"a zip holding a pickle ({inner[0]}; torch.save format)"
    return None


# ---------------------------------------------------------------- package


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FtError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise FtError(f"{path}: not valid JSON ({exc})") from None


def _check_complete(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """run.json and eval/report.json of a finished, evaluated run, or FtError saying what is missing."""
    if not run_dir.is_dir():
        raise FtError(f"{run_dir}: no such run directory")
    if not (run_dir / "run.json").is_file():
        raise FtError(f"{run_dir}: not a finished run (no run.json); train and evaluate it first")
    run = _read_json(run_dir / "run.json")
    if not isinstance(run, dict) or run.get("status") != "complete":
        status = run.get("status") if isinstance(run, dict) else None
        raise FtError(
            f"{run_dir}: run status is {status!r}, not 'complete'; only finished runs can be sealed",
            hint="finish it with `ft train --resume auto`, then `ft eval`",
        )
    if not (run_dir / "eval" / "report.json").is_file():
        raise FtError(f"{run_dir}: no eval/report.json; evaluate the run (`ft eval`) before sealing it")
    report = _read_json(run_dir / "eval" / "report.json")
    verdict = (report.get("decision") or {}).get("verdict") if isinstance(report, dict) else None
    if verdict not in ("KEEP", "DISCARD"):
        raise FtError(
            f"{run_dir / 'eval' / 'report.json'}: decision.verdict is {verdict!r}, not KEEP or DISCARD"
        )
    for rel in REQUIRED:
        if not (run_dir / rel).is_file():
            raise FtError(f"{run_dir}: {rel} is missing; the run is incomplete")
    adapter = run_dir / "adapter"
    if not adapter.is_dir() or not any(adapter.iterdir()):
        raise FtError(f"{run_dir}: adapter/ is missing or empty; the run is incomplete")
    for top in BUNDLED_DIRS:
        if (run_dir / top).is_symlink():
            raise FtError(
                f"{run_dir / top}: is a symbolic link; bundles hold only plain files and directories"
            )
    for rel in ("env.json", "data.json"):
        if not isinstance(_read_json(run_dir / rel), dict):
            raise FtError(f"{run_dir / rel}: not a JSON object")
    return run, report


def _is_staging_leftover(name: str) -> bool:
    """Temp files/dirs of an interrupted atomic write (see fsutil); never part of a run's outputs."""
    return name.startswith(".") and name.endswith((".tmp", ".partial", ".old"))


def _run_files(run_dir: Path) -> list[tuple[str, Path]]:
    """(bundle path, source) for every file that goes into the bundle; refuses links, devices, pickles."""
    picked = [(rel, run_dir / rel) for rel in REQUIRED + OPTIONAL if (run_dir / rel).is_file()]
    for top in BUNDLED_DIRS:
        for dirpath, dirs, files in os.walk(run_dir / top):
            dirs[:] = sorted(d for d in dirs if not _is_staging_leftover(d))
            for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
                path = Path(dirpath, name)
                rel = path.relative_to(run_dir).as_posix()
                if not _is_staging_leftover(name) and rel not in REQUIRED:
                    picked.append((rel, path))
    for _rel, path in picked:
        mode = os.lstat(path).st_mode
        if not stat.S_ISREG(mode):
            raise FtError(
                f"{path}: not a regular file (symlink or special file); bundles hold only plain files"
            )
        if problem := pickle_problem(path):
            raise FtError(f"{path}: refusing to bundle a pickle: {problem}")
    return sorted(picked)


def _data_source(entry: dict[str, Any], run_dir: Path) -> Path | None:
    raw = str(entry.get("path") or entry.get("name") or "")
    if raw.startswith("builtin:"):
        from ft.config import builtin_data_path

        return builtin_data_path(raw.split(":", 1)[1])
    path = Path(raw)
    candidates = (
        [path] if path.is_absolute() else [Path.cwd() / path, run_dir / path, run_dir.parent.parent / path]
    )
    return next((c for c in candidates if c.is_file()), None)


def _data_files(run_dir: Path, given: list[Path] | None) -> list[tuple[str, Path, str]]:
    """(bundle path, source, expected sha256) per data.json entry, each hash checked before copying."""
    meta = _read_json(run_dir / "data.json")
    entries = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(entries, list) or not entries:
        raise FtError(f"{run_dir / 'data.json'}: no 'files' list; cannot include the data")
    by_hash = {sha256_file(p): Path(p) for p in given or []}
    out: list[tuple[str, Path, str]] = []
    used: set[str] = set()
    for i, entry in enumerate(entries):
        label = entry.get("name") or entry.get("path") or f"files[{i}]"
        expected = str(entry.get("sha256", ""))
        if given is not None:
            src = by_hash.pop(expected, None)
            if src is None:
                raise FtError(f"data.json: {label}: none of the given data files has sha256 {expected[:12]}")
        else:
            src = _data_source(entry, run_dir)
            if src is None:
                raise FtError(
                    f"data.json: {label}: file not found at {entry.get('path')!r}", hint="pass its location"
                )
            actual = sha256_file(src)
            if actual != expected:
                raise FtError(
                    f"{src}: sha256 {actual[:12]} does not match data.json ({expected[:12]}); "
                    "the data changed since training, refusing to bundle it"
                )
        name = Path(str(entry.get("name") or src.name).removeprefix("builtin:")).name or src.name
        rel = f"data/{name}" if f"data/{name}" not in used else f"data/{i}-{name}"
        used.add(rel)
        out.append((rel, src, expected))
    if by_hash:
        extra = next(iter(by_hash.values()))
        raise FtError(f"{extra}: its sha256 matches no file in data.json; it was not used by this run")
    return out


def _copy_hashed(src: Path, dest: Path) -> tuple[str, int]:
    """Copy bytes (no metadata) and hash what was written in one pass."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    h, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        while chunk := fin.read(CHUNK):
            h.update(chunk)
            fout.write(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _run_end(run: dict[str, Any], run_dir: Path) -> int:
    """When the run ended (epoch seconds): stamps MANIFEST and archive so re-sealing gives equal bytes."""
    for key in ("ended", "end_time", "ended_at", "finished", "completed"):
        value = run.get(key)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                when = datetime.fromisoformat(value.replace("Z", "+00:00"))
                return int((when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp())
    return int((run_dir / "eval" / "report.json").stat().st_mtime)


def _bundle_name(run: dict[str, Any], run_dir: Path) -> str:
    name = str(run.get("name") or run_dir.name)
    if not name or name.startswith(".") or any(c in name for c in "/\\:\x00") or name in (".", ".."):
        raise FtError(f"{run_dir / 'run.json'}: run name {name!r} is not usable as a directory name")
    return name


def package(
    run_dir: Path,
    out_dir: Path | None = None,
    *,
    include_data: bool = False,
    data_files: list[Path] | None = None,
    sign_key: Path | None = None,
    archive: bool = True,
) -> Path:
    """Seal `run_dir` into `<out_dir>/<run name>/` (+ `<run name>.tar.gz`); returns the bundle directory.

    `data_files` says where the run's data files are (matched to data.json by sha256) and implies
    `include_data`; without it they are looked up at the paths data.json records.
    """
    run_dir = Path(run_dir)
    run, report = _check_complete(run_dir)
    name = _bundle_name(run, run_dir)
    out_dir = Path(out_dir) if out_dir is not None else DEFAULT_OUT_DIR
    final, tar_path = out_dir / name, out_dir / f"{name}.tar.gz"
    for path in (final, tar_path):
        if path.exists():
            raise FtError(f"{path}: already exists; choose another output directory or remove it")
    if sign_key is not None:
        signing.check_private_key(Path(sign_key))
    files = _run_files(run_dir)
    data = _data_files(run_dir, data_files) if (include_data or data_files) else []
    ended = _run_end(run, run_dir)

    with atomic_dir(final) as staging:
        listed: list[dict[str, Any]] = []
        for rel, src in files:
            digest, size = _copy_hashed(src, staging / rel)
            listed.append({"path": rel, "sha256": digest, "bytes": size})
        for rel, src, expected in data:
            digest, size = _copy_hashed(src, staging / rel)
            if digest != expected:
                raise FtError(
                    f"{src}: changed while being bundled (sha256 {digest[:12]}, data.json {expected[:12]})"
                )
            listed.append({"path": rel, "sha256": digest, "bytes": size})
        write_text(staging / "README.md", render_readme(staging, name, report, signed=sign_key is not None))
        readme = staging / "README.md"
        listed.append({"path": "README.md", "sha256": sha256_file(readme), "bytes": readme.stat().st_size})
        manifest = {
            "format": FORMAT,
            "created": datetime.fromtimestamp(ended, timezone.utc).isoformat().replace("+00:00", "Z"),
            "run": name,
            "files": sorted(listed, key=lambda e: e["path"]),
            "recipe_sha256": run.get("recipe_sha256") or sha256_file(staging / "recipe.resolved.yaml"),
            "env_sha256": sha256_file(staging / "env.json"),
            "data_sha256": run.get("data_sha256"),
            "data_included": bool(data),
            "verdict": report["decision"]["verdict"],
        }
        write_bytes(staging / MANIFEST, dumps_json(manifest).encode("utf-8"))  # last: marks the bundle whole
        if sign_key is not None:
            signing.sign_file(staging / MANIFEST, Path(sign_key))
    if archive:
        write_tar_gz(final, tar_path, root=name, mtime=ended)
    return final


# ---------------------------------------------------------------- README


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))


def _env_lines(env: dict[str, Any]) -> list[str]:
    gpu = env.get("gpu") or {}
    gpus = ", ".join(d.get("name", "?") for d in gpu.get("devices") or []) or "none (CPU)"
    packages = env.get("packages") or {}
    torch = packages.get("torch") or (env.get("torch") or {}).get("version")
    git = env.get("git_commit") or (env.get("git") or {}).get("commit")
    return [
        f"- GPU: {gpus}; NVIDIA driver {_fmt(gpu.get('driver'))}, CUDA {_fmt(gpu.get('cuda_runtime'))}, cuDNN {_fmt(gpu.get('cudnn'))}",
        f"- Python {_fmt(env.get('python'))} on {_fmt(env.get('os'))}; torch {_fmt(torch)}, transformers "
        f"{_fmt(packages.get('transformers'))}, peft {_fmt(packages.get('peft'))}, trl {_fmt(packages.get('trl'))}",
        f"- Image: `{_fmt((env.get('image') or {}).get('id'))}`",
        f"- Lockfile sha256: `{_fmt((env.get('lockfile') or {}).get('sha256'))}`",
        f"- Git commit: `{_fmt(git)}`",
    ]


def render_readme(bundle: Path, name: str, report: dict[str, Any], *, signed: bool) -> str:
    """README.md for the engineer who receives the bundle: what it is, how to check it, how to rerun it."""
    import yaml

    try:
        recipe = yaml.safe_load((bundle / "recipe.resolved.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise FtError(f"recipe.resolved.yaml: cannot read the resolved recipe ({exc})") from None
    env = _read_json(bundle / "env.json")
    decision = report["decision"]
    metrics = report.get("metrics") or {}
    base, tuned = metrics.get("base") or {}, metrics.get("tuned") or {}
    archive = f"{name}.tar.gz"
    lines = [
        f"# {name}",
        "",
        f"A sealed `ft` fine-tuning run: a LoRA adapter for `{(recipe.get('model') or {}).get('name_or_path', '?')}` "
        f"trained with recipe `{recipe.get('name', '?')}`"
        + (f" ({recipe['description']})." if recipe.get("description") else "."),
        "",
        f"## Verdict: {decision['verdict']}",
        "",
        *[f"- {reason}" for reason in decision.get("reasons", [])],
        "",
        "| metric (held-out prompts) | base | tuned |",
        "|---|---:|---:|",
        *[f"| {m} | {_fmt(base.get(m))} | {_fmt(v)} |" for m, v in tuned.items()],
        "",
        "## What is in here",
        "",
        "- `adapter/`: the LoRA adapter; `peft.PeftModel.from_pretrained(base_model, 'adapter')` loads it.",
        "- `recipe.resolved.yaml`: every setting the run used; `run.json`: name, status, hashes, backend.",
        "- `env.json`: the environment it ran in; `data.json`: data files, sha256s, row counts, split.",
        "- `metrics.jsonl`: per-step training metrics; `eval/`: report, predictions, loss curve; `decision.md`.",
        "- `data/`: the training data (only when sealed with `--include-data`).",
        "- `MANIFEST.json`: sha256 and size of every other file"
        + ("; `MANIFEST.json.sig`: its Ed25519 signature." if signed else "."),
        "",
        "## Verify it",
        "",
        f"    ft verify {archive}            # or the unpacked directory",
        *([f"    ft verify {archive} --key PUBLIC.pem   # the signer's public key"] if signed else []),
        "",
        "Any changed, missing, extra or renamed file fails and is named. Without ft, check each file with "
        "`sha256sum` against MANIFEST.json.",
        "",
        "## Rerun it",
        "",
        f"    ft reproduce {archive}",
        f"    {COMPOSE_REPRODUCE.format(archive=archive)}",
        "",
        "This retrains the sealed recipe on the sealed data (bundled in `data/`, or found by sha256) and prints, side by "
        "side, which environment facts differ from `env.json` and how far the new metrics are from the sealed ones.",
        "",
        "## Made in",
        "",
        *_env_lines(env),
        "",
    ]
    return "\n".join(lines)


def render_package(bundle_dir: Path) -> str:
    """What `ft package` prints: where the bundle is and how to check it."""
    bundle_dir = Path(bundle_dir)
    manifest = json.loads((bundle_dir / MANIFEST).read_text(encoding="utf-8"))
    total = sum(e["bytes"] for e in manifest["files"])
    tar_path = bundle_dir.with_name(bundle_dir.name + ".tar.gz")
    signed = (bundle_dir / SIGNATURE).is_file()
    lines = [
        f"bundle   {bundle_dir}/  ({len(manifest['files'])} files, {total / 2**20:.1f} MiB, verdict {manifest['verdict']})"
    ]
    target = bundle_dir
    if tar_path.is_file():
        lines.append(f"archive  {tar_path}  (sha256 {sha256_file(tar_path)})")
        target = tar_path
    lines.append("signed   " + (f"yes ({SIGNATURE})" if signed else "no (sign with --sign-key PRIVATE.pem)"))
    lines.append(f"verify   ft verify {target}" + (" --key PUBLIC.pem" if signed else ""))
    lines.append(f"rerun    ft reproduce {target}")
    return "\n".join(lines)


# ---------------------------------------------------------------- verify


@dataclass
class VerifyReport:
    """What `verify` found; `problems` is empty when the bundle is intact."""

    path: Path
    bundle_dir: Path | None = None
    manifest: dict[str, Any] | None = None
    files_checked: int = 0
    bytes_checked: int = 0
    signed: bool = False  # a signature was checked against a key and matched
    signature_present: bool = False
    key_fingerprint: str | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def one_line(self) -> str:
        more = f" (+{len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return f"{self.path}: {self.problems[0]}{more}" if self.problems else f"{self.path}: OK"

    def render(self) -> str:
        """What `ft verify` prints."""
        head = "OK" if self.ok else f"FAILED ({len(self.problems)} problem{'s' * (len(self.problems) != 1)})"
        run = (self.manifest or {}).get("run", "?")
        lines = [
            f"{head}: {self.path}",
            f"  run {run}, verdict {(self.manifest or {}).get('verdict', '?')}; "
            f"{self.files_checked} files, {self.bytes_checked / 2**20:.1f} MiB checked against {MANIFEST}",
        ]
        if self.signed:
            lines.append(f"  signature: valid ({SIGNATURE}, key {self.key_fingerprint})")
        elif not self.signature_present:
            lines.append("  signature: none (unsigned bundle)")
        lines += [f"  - {p}" for p in self.problems] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class BundleError(FtError):
    """Verification failed; `.report` holds every problem for a full listing."""

    def __init__(self, report: VerifyReport):
        super().__init__(report.one_line())
        self.report = report


def _manifest_problems(manifest: Any) -> list[str]:
    if not isinstance(manifest, dict):
        return [f"{MANIFEST}: not a JSON object"]
    if manifest.get("format") != FORMAT:
        return [f"{MANIFEST}: format {manifest.get('format')!r} is not {FORMAT!r}"]
    files = manifest.get("files")
    if not isinstance(files, list):
        return [f"{MANIFEST}: 'files' is not a list"]
    problems, seen = [], set()
    for i, entry in enumerate(files):
        where = f"{MANIFEST}: files[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: not an object")
            continue
        path, digest, size = entry.get("path"), entry.get("sha256"), entry.get("bytes")
        if not isinstance(path, str) or not path or "\\" in path or "\x00" in path:
            problems.append(f"{where}.path: not a usable path")
        elif (
            PurePosixPath(path).is_absolute()
            or ".." in PurePosixPath(path).parts
            or path in (MANIFEST, SIGNATURE)
        ):
            problems.append(
                f"{where}.path: {path!r} is absolute, climbs out with '..', or names the manifest"
            )
        elif path in seen:
            problems.append(f"{where}.path: {path!r} listed twice")
        if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _HEX):
            problems.append(f"{where}.sha256: not a sha256 hex digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            problems.append(f"{where}.bytes: not a size in bytes")
        seen.add(path)
    return problems


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry under `root` (hidden ones too, links not followed) as (posix relpath, lstat)."""
    for dirpath, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = os.path.join(dirpath, name)
            yield Path(path).relative_to(root).as_posix(), os.lstat(path)


def _hash_and_size(path: Path) -> tuple[str, int]:
    return sha256_file(path), path.stat().st_size


def _check_signature(bundle: Path, report: VerifyReport, key: Path | None) -> None:
    sig = bundle / SIGNATURE
    report.signature_present = sig.is_file() and not sig.is_symlink()
    if sig.exists() and not report.signature_present:
        report.problems.append(f"{SIGNATURE}: not a regular file")
        return
    if key is not None and not report.signature_present:
        report.problems.append(f"{SIGNATURE}: missing; the bundle is unsigned but a key was given")
        return
    if not report.signature_present:
        return
    try:
        if key is None:
            signing.decode_signature(sig)
            report.notes.append(
                f"{SIGNATURE} is present but was not checked (pass --key PUBLIC.pem to check it)"
            )
        else:
            signing.verify_file(bundle / MANIFEST, sig, key)
            report.signed = True
    except FtError as exc:
        report.problems.append(str(exc))


def _check_dir(bundle: Path, report: VerifyReport, key: Path | None) -> None:
    report.bundle_dir = bundle
    mpath = bundle / MANIFEST
    if not mpath.is_file() or mpath.is_symlink():
        report.problems.append(
            f"{MANIFEST}: missing; this is not a sealed bundle (or sealing did not finish)"
        )
        return
    try:
        manifest = json.loads(mpath.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        report.problems.append(f"{MANIFEST}: not valid JSON ({exc})")
        return
    if shape := _manifest_problems(manifest):
        report.problems.extend(shape)
        return
    report.manifest = manifest
    _check_signature(bundle, report, key)

    changed, missing, extra = [], {}, {}
    listed = {e["path"]: e for e in manifest["files"]}
    for path, entry in listed.items():
        full = bundle / path
        try:
            mode = os.lstat(full).st_mode
        except OSError:
            missing[path] = entry
            continue
        if not stat.S_ISREG(mode):
            changed.append(f"{path}: not a regular file (symlink, directory or special file)")
            continue
        digest, size = _hash_and_size(full)
        report.files_checked += 1
        report.bytes_checked += size
        if size != entry["bytes"]:
            changed.append(f"{path}: size changed ({size} bytes, {MANIFEST} says {entry['bytes']})")
        elif digest != entry["sha256"]:
            changed.append(
                f"{path}: content changed (sha256 {digest[:12]}..., {MANIFEST} says {entry['sha256'][:12]}...)"
            )
        elif problem := pickle_problem(full):
            changed.append(f"{path}: a pickle ({problem}); bundles hold no pickles")

    holders = {"/".join(p.split("/")[:i]) for p in listed for i in range(1, p.count("/") + 1)}
    dirs: list[str] = []
    for rel, st in _walk(bundle):
        if rel in listed or rel in (MANIFEST, SIGNATURE):
            continue
        if stat.S_ISDIR(st.st_mode):
            dirs.append(rel)
        elif stat.S_ISREG(st.st_mode):
            digest, size = _hash_and_size(bundle / rel)
            twin = next((p for p, e in missing.items() if (e["sha256"], e["bytes"]) == (digest, size)), None)
            extra[rel] = f"{rel}: extra file not in {MANIFEST}" + (f" (renamed from {twin}?)" if twin else "")
            if twin:
                missing[twin] = {**missing[twin], "renamed_to": rel}
        else:
            kind = "symbolic link" if stat.S_ISLNK(st.st_mode) else "special file"
            extra[rel] = f"{rel}: extra {kind} not in {MANIFEST}"
    for rel in dirs:  # an unlisted directory is reported only when no extra file inside names it already
        if rel not in holders and not any(r.startswith(rel + "/") for r in extra):
            extra[rel] = f"{rel}/: extra directory not in {MANIFEST}"
    report.problems += changed
    report.problems += [
        f"{p}: missing"
        + (f" (renamed to {e['renamed_to']}?)" if "renamed_to" in e else f" (listed in {MANIFEST})")
        for p, e in sorted(missing.items())
    ]
    report.problems += [extra[r] for r in sorted(extra)]


def _bundle_root(target: Path, report: VerifyReport) -> Path:
    """The bundle directory inside an extracted archive: its single top-level directory."""
    children = sorted(target.iterdir())
    roots = [c for c in children if c.is_dir() and (c / MANIFEST).is_file()]
    if (target / MANIFEST).is_file() or len(roots) != 1:
        return target
    for other in children:
        if other != roots[0]:
            report.problems.append(f"{other.name}: extra entry in the archive beside the bundle directory")
    return roots[0]


def open_bundle(
    path: Path, work_dir: Path | None = None, *, key: Path | None = None
) -> tuple[Path, VerifyReport]:
    """Verify `path` (directory or archive) and return the verified bundle directory.

    An archive is safely extracted into `work_dir` (new or empty; a fresh temporary directory when None)
    which the caller owns. Raises BundleError (an FtError) when verification fails.
    """
    path = Path(path)
    report = VerifyReport(path=path)
    if key is not None:  # a bad key file is the user's error, not the bundle's: raised as is
        report.key_fingerprint = signing.fingerprint(Path(key))
    if path.is_dir():
        _check_dir(path, report, key)
    elif path.is_file():
        target = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="ft-bundle-"))
        try:
            safe_extract(path, target)
        except FtError as exc:
            report.problems.append(exc.message.removeprefix(f"{path}: "))
        else:
            _check_dir(_bundle_root(target, report), report, key)
        if not report.ok and work_dir is None:
            shutil.rmtree(target, ignore_errors=True)  # ours, and worthless: do not leave it behind
    else:
        raise FtError(f"{path}: no such bundle directory or archive")
    if not report.ok:
        raise BundleError(report)
    return report.bundle_dir, report


def verify(path: Path, *, key: Path | None = None, raise_on_failure: bool = True) -> VerifyReport:
    """Recompute every file of a bundle directory or .tar.gz against its MANIFEST (and signature with `key`).

    An archive is extracted into a temporary directory that is removed afterwards. A failure raises
    BundleError, whose one-line message names the first problem; pass `raise_on_failure=False` to get
    the report back instead.
    """
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="ft-verify-") as tmp:
        try:
            _, report = open_bundle(path, None if path.is_dir() else Path(tmp) / "x", key=key)
        except BundleError as exc:
            if raise_on_failure:
                raise
            report = exc.report
    if not path.is_dir():
        report.bundle_dir = None  # it lived in the temporary directory, now gone
    return report


__all__ = [
    "FORMAT",
    "MANIFEST",
    "SIGNATURE",
    "BundleError",
    "VerifyReport",
    "open_bundle",
    "package",
    "pickle_problem",
    "render_package",
    "verify",
]
