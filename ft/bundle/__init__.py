"""Seal a finished run into a bundle, and verify a bundle someone handed you.

A bundle is a directory (and a deterministic .tar.gz of it) whose MANIFEST.json lists every file's
path, sha256 and size; anyone can recompute it with `sha256sum`, and `ft verify` does so and names the
first file that changed, went missing or appeared. The manifest is written last, so a directory without
one is not a bundle. The manifest's own sha256 (in its one canonical form) is the bundle's identity,
printed, written beside the bundle and into its README (`ft.bundle.identity`). An optional Ed25519
signature over the manifest's bytes (MANIFEST.json.sig, see `ft.bundle.signing`) vouches for who sealed
it. Bundles hold no pickles (`ft.bundle.pickles`), refused at both ends. Verification lives in
`ft.bundle.check`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ft.bundle import identity, signing
from ft.bundle.archive import write_tar_gz
from ft.bundle.check import BundleError, VerifyReport, open_bundle, verify
from ft.bundle.identity import FORMAT, MANIFEST, README, SIGNATURE
from ft.bundle.pickles import PICKLE_SUFFIXES, pickle_problem
from ft.errors import FtError
from ft.fsutil import CHUNK, atomic_dir, sha256_file, write_bytes, write_text

DEFAULT_OUT_DIR = Path("bundles")  # same default as recipe `output.bundle_dir`
REQUIRED = ("run.json", "recipe.resolved.yaml", "env.json", "data.json", "eval/report.json")
OPTIONAL = ("metrics.jsonl", "decision.md")
BUNDLED_DIRS = ("adapter", "eval", "export")  # export/: `ft export` (ft.export) seals its files there
# What `docker compose` runs to rerun a bundle inside the project's image: compose.yaml's generic `ft`
# service (GPU, entrypoint `ft`); the archive sits in ./bundles, and the rerun lands in ./runs, both
# mounted, so its results outlive the container.
COMPOSE_REPRODUCE = "docker compose run --rm ft reproduce bundles/{archive} --work runs/reproduce"
COMPOSE_VERIFY = "docker compose run --rm verify bundles/{archive}"


# ---------------------------------------------------------------- package


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FtError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except RecursionError:
        raise FtError(f"{path}: not valid JSON (nested too deeply)") from None
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


def _data_files(
    run_dir: Path, given: list[Path] | None, scratch: Path | None = None
) -> list[tuple[str, Path, str]]:
    """(bundle path, source, expected sha256) per data.json entry, each hash checked before copying.

    A Hub split is written into `scratch` as canonical JSON Lines (what data.json's sha256 covers)."""
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
        elif entry.get("format") == "hf" and scratch is not None:  # a Hub split: its rows, as JSON Lines
            from ft.data import hub

            src = scratch / f"{i}.jsonl"
            hub.write_canonical(entry, src)
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
        if entry.get("format") == "hf":
            name = f"{entry.get('dataset', 'hub').replace('/', '--')}-{entry.get('split', 'train')}.jsonl"
        else:
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
    sidecar = identity.sidecar_path(final)
    for path in (final, tar_path, sidecar):
        if path.exists():
            raise FtError(f"{path}: already exists; choose another output directory or remove it")
    if sign_key is not None:
        signing.check_private_key(Path(sign_key))
    files = _run_files(run_dir)
    with tempfile.TemporaryDirectory(prefix="ft-bundle-rows.") as tmp:
        scratch = Path(tmp)
        data = _data_files(run_dir, data_files, scratch) if (include_data or data_files) else []
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
            # The manifest lists the README without its last line, which names the manifest's own digest.
            body = render_readme(staging, name, report, signed=sign_key is not None).encode("utf-8")
            listed.append({"path": README, "sha256": identity.digest(body), "bytes": len(body)})
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
            raw = identity.canonical(manifest)
            bundle_id = identity.digest(raw)
            write_bytes(staging / README, body + identity.readme_line(bundle_id).encode("utf-8"))
            write_bytes(staging / MANIFEST, raw)  # last: marks the bundle whole
            if sign_key is not None:
                signing.sign_file(staging / MANIFEST, Path(sign_key))
        write_text(sidecar, identity.sidecar_text(bundle_id, name))
        if archive:
            write_tar_gz(final, tar_path, root=name, mtime=ended)
        return final


# ---------------------------------------------------------------- README


def _nodes_lines(env: Any) -> list[str]:
    """A run trained by several processes: every node it ran on, from env.json's `distributed`."""
    from ft.manifest import render_nodes

    dist = env.get("distributed") if isinstance(env, dict) else None
    return [f"  - {line.split(maxsplit=1)[0]}: {line.split(maxsplit=1)[1]}" for line in render_nodes(dist)]


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
    except RecursionError:
        raise FtError("recipe.resolved.yaml: cannot read the resolved recipe (nested too deeply)") from None
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
        *_nodes_lines(env),
        "- `metrics.jsonl`: per-step training metrics; `eval/`: report, predictions, loss curve; `decision.md`.",
        "- `data/`: the training data (only when sealed with `--include-data`).",
        "- `MANIFEST.json`: sha256 and size of every other file"
        + ("; `MANIFEST.json.sig`: its Ed25519 signature." if signed else "."),
        "",
        "## Verify it",
        "",
        f"    ft verify {archive}            # or the unpacked directory",
        *(
            [f"    ft verify {archive} --key PUBLIC.pem --require-signature   # the signer's public key"]
            if signed
            else []
        ),
        f"    {COMPOSE_VERIFY.format(archive=archive)}   # the same, in the project's container",
        "",
        "Any changed, missing, extra or renamed file fails and is named. The bundle's identity is the sha256 of "
        f"`MANIFEST.json` (kept in one canonical form); it is the last line of this file, `ft verify` prints it, "
        f"and `{name}{identity.SIDECAR_SUFFIX}` beside the archive records it: compare it with the one the sender "
        "gave you. Without ft: `sha256sum MANIFEST.json`, then check each file with `sha256sum` against "
        "MANIFEST.json (README.md is listed without its last line: `head -n -1 README.md | sha256sum`).",
        "",
        "## Rerun it",
        "",
        f"    ft reproduce {archive}" + (" --key PUBLIC.pem" if signed else ""),
        f"    {COMPOSE_REPRODUCE.format(archive=archive)}" + (" --key bundles/PUBLIC.pem" if signed else ""),
        "",
        "This retrains the sealed recipe on the sealed data (bundled in `data/`, or found by sha256) and prints, side by "
        "side, which environment facts differ from `env.json` and how far the new metrics are from the sealed ones. "
        "Each rerun gets a fresh folder under `--work` (default `reproduce/`). No code from the bundle runs: a model "
        "inside the bundle is never loaded, and a recipe with `model.trust_remote_code: true` is refused unless you "
        "pass `--trust-remote-code` and the bundle's signature verifies with `--key`.",
        "",
        "## Made in",
        "",
        *_env_lines(env),
        "",
        "",  # a blank line before the identity line, so Markdown does not fold it into the list above
    ]
    return "\n".join(lines)


def render_package(bundle_dir: Path) -> str:
    """What `ft package` prints: where the bundle is, its identity, and how to check it."""
    bundle_dir = Path(bundle_dir)
    raw = (bundle_dir / MANIFEST).read_bytes()
    manifest = json.loads(raw)
    total = sum(e["bytes"] for e in manifest["files"])
    tar_path = bundle_dir.with_name(bundle_dir.name + ".tar.gz")
    sidecar = identity.sidecar_path(bundle_dir)
    signed = (bundle_dir / SIGNATURE).is_file()
    lines = [
        f"bundle   {bundle_dir}/  ({len(manifest['files'])} files, {total / 2**20:.1f} MiB, verdict {manifest['verdict']})",
        f"identity {identity.digest(raw)}  (sha256 of {MANIFEST}; in {sidecar} and the README: "
        "tell the receiver, who compares it with what `ft verify` prints)",
    ]
    target = bundle_dir
    if tar_path.is_file():
        lines.append(f"archive  {tar_path}  (sha256 {sha256_file(tar_path)})")
        target = tar_path
    lines.append("signed   " + (f"yes ({SIGNATURE})" if signed else "no (sign with --sign-key PRIVATE.pem)"))
    lines.append(f"verify   ft verify {target}" + (" --key PUBLIC.pem --require-signature" if signed else ""))
    lines.append(f"rerun    ft reproduce {target}" + (" --key PUBLIC.pem" if signed else ""))
    return "\n".join(lines)


__all__ = [
    "FORMAT",
    "MANIFEST",
    "PICKLE_SUFFIXES",
    "SIGNATURE",
    "BundleError",
    "VerifyReport",
    "open_bundle",
    "package",
    "pickle_problem",
    "render_package",
    "verify",
]
