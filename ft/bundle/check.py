"""Verify a bundle someone handed you: every file, the manifest's own form and identity, the signature.

`ft verify` recomputes each listed file's sha256 and size and names the first file that changed, went
missing or appeared; checks that MANIFEST.json is in canonical form and that its digest (the bundle's
identity) matches the one recorded in the README and the sidecar; and, given the signer's public key,
checks the Ed25519 signature. An archive is unpacked by `ft.bundle.archive.safe_extract` with the
manifest's sizes as the limit, so a small archive cannot fill the disk.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ft.bundle import identity as ident
from ft.bundle import signing
from ft.bundle.archive import safe_extract
from ft.bundle.identity import FORMAT, MANIFEST, README, SIGNATURE
from ft.bundle.pickles import pickle_problem
from ft.errors import FtError
from ft.fsutil import sha256_file

_HEX = set("0123456789abcdef")
_README_LINE_BYTES = len(ident.readme_line("0" * 64).encode("utf-8"))
_SIGNATURE_MAX_BYTES = 4096


@dataclass
class VerifyReport:
    """What `verify` found; `problems` is empty when the bundle is intact."""

    path: Path
    bundle_dir: Path | None = None
    manifest: dict[str, Any] | None = None
    identity: str | None = None  # sha256 of MANIFEST.json (canonical form), once it parsed
    sidecar: Path | None = None  # the <name>.manifest.sha256 it was compared with, when one was found
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
        if self.identity:
            where = f"{self.sidecar.name} and {README}" if self.sidecar else README
            lines.append(
                f"  identity: {self.identity} (sha256 of {MANIFEST}; recorded in {where}; "
                "compare it with what the sender told you)"
            )
        if self.signed:
            lines.append(f"  signature: valid ({SIGNATURE}, key {self.key_fingerprint})")
        elif self.signature_present:
            lines.append(
                f"  signature: NOT CHECKED ({SIGNATURE} is present but no --key was given, so anyone who "
                "edited this bundle could have re-sealed it; pass --key PUBLIC.pem to check it)"
            )
        else:
            lines.append("  signature: none (unsigned bundle)")
        lines += [f"  - {p}" for p in self.problems] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class BundleError(FtError):
    """Verification failed; `.report` holds every problem for a full listing."""

    def __init__(self, report: VerifyReport):
        super().__init__(report.one_line())
        self.report = report


def manifest_problems(manifest: Any) -> list[str]:
    """What is wrong with a parsed manifest's shape (format, file entries); empty when nothing."""
    if not isinstance(manifest, dict):
        return [f"{MANIFEST}: not a JSON object"]
    if manifest.get("format") != FORMAT:
        old = manifest.get("format") == "ft-bundle/1"
        return [
            f"{MANIFEST}: format {manifest.get('format')!r} is not {FORMAT!r}"
            + ("; sealed by an older ft without a bundle identity: ask for it to be re-sealed" if old else "")
        ]
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


def archive_limits(raw: bytes) -> tuple[dict[str, int], int]:
    """Most bytes each bundle path may hold, and in all, according to an archive's MANIFEST.json."""
    manifest = ident.parse(raw)
    if shape := manifest_problems(manifest):
        raise FtError(shape[0])
    per_path = {e["path"]: e["bytes"] for e in manifest["files"]}
    if README in per_path:  # its identity line is not covered by its entry (see ft.bundle.identity)
        per_path[README] += _README_LINE_BYTES
    return per_path, sum(per_path.values()) + len(raw) + _SIGNATURE_MAX_BYTES


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
        if sig.stat().st_size > _SIGNATURE_MAX_BYTES:
            raise FtError(f"{SIGNATURE}: {sig.stat().st_size} bytes, not a signature")
        if key is None:
            signing.decode_signature(sig)
        else:
            signing.verify_file(bundle / MANIFEST, sig, key)
            report.signed = True
    except FtError as exc:
        report.problems.append(str(exc))


def _readme_problem(full: Path, entry: dict[str, Any], identity: str) -> str | None:
    """README.md must be its listed text plus one last line naming this bundle's identity."""
    line = ident.readme_line(identity).encode("utf-8")
    size = full.stat().st_size
    if size > entry["bytes"] + 2 * len(line):
        return f"{README}: size changed ({size} bytes, {MANIFEST} says {entry['bytes']} + its identity line)"
    blob = full.read_bytes()
    if not blob.endswith(line):
        return f"{README}: its last line does not give this bundle's identity ({identity[:12]}...)"
    body = blob[: -len(line)]
    if len(body) != entry["bytes"]:
        return f"{README}: size changed ({len(body)} bytes above the identity line, {MANIFEST} says {entry['bytes']})"
    if ident.digest(body) != entry["sha256"]:
        return f"{README}: content changed (sha256 of the text above the identity line does not match {MANIFEST})"
    return None


def _check_listed(
    bundle: Path, report: VerifyReport, listed: dict[str, dict[str, Any]]
) -> tuple[list[str], dict[str, dict[str, Any]], list[str]]:
    """(changed files, missing files, README identity problems) for every file the manifest lists."""
    changed: list[str] = []
    readme: list[str] = []
    missing: dict[str, dict[str, Any]] = {}
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
        report.files_checked += 1
        if path == README:
            report.bytes_checked += full.stat().st_size
            if problem := _readme_problem(full, entry, report.identity or ""):
                readme.append(problem)
            continue
        digest, size = _hash_and_size(full)
        report.bytes_checked += size
        if size != entry["bytes"]:
            changed.append(f"{path}: size changed ({size} bytes, {MANIFEST} says {entry['bytes']})")
        elif digest != entry["sha256"]:
            changed.append(
                f"{path}: content changed (sha256 {digest[:12]}..., {MANIFEST} says {entry['sha256'][:12]}...)"
            )
        elif problem := pickle_problem(full):
            changed.append(f"{path}: a pickle ({problem}); bundles hold no pickles")
    return changed, missing, readme


def _check_unlisted(
    bundle: Path, listed: dict[str, Any], missing: dict[str, dict[str, Any]]
) -> dict[str, str]:
    holders = {"/".join(p.split("/")[:i]) for p in listed for i in range(1, p.count("/") + 1)}
    extra: dict[str, str] = {}
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
    return extra


def _check_verdict(bundle: Path, report: VerifyReport, listed: dict[str, Any]) -> None:
    """The manifest's verdict must be the evaluation's: a reader trusts the one on top."""
    if "eval/report.json" not in listed or not report.ok:
        return
    try:
        verdict = (json.loads((bundle / "eval" / "report.json").read_bytes()).get("decision") or {}).get(
            "verdict"
        )
    except (ValueError, RecursionError, AttributeError, OSError):
        verdict = None
    if verdict != (report.manifest or {}).get("verdict"):
        report.problems.append(
            f"{MANIFEST}: verdict {(report.manifest or {}).get('verdict')!r} is not eval/report.json's {verdict!r}"
        )


def _check_sidecar(report: VerifyReport) -> None:
    sidecar = ident.sidecar_path(report.path)
    if not sidecar.is_file() or report.identity is None:
        return
    report.sidecar = sidecar
    try:
        recorded = ident.read_sidecar(sidecar)
    except FtError as exc:
        report.problems.append(str(exc))
        return
    if recorded != report.identity:
        report.problems.append(
            f"{MANIFEST}: identity {report.identity[:12]}... is not the {recorded[:12]}... recorded in "
            f"{sidecar.name}; the manifest changed after sealing (or the sidecar is another bundle's)"
        )


def _check_dir(bundle: Path, report: VerifyReport, key: Path | None) -> None:
    report.bundle_dir = bundle
    mpath = bundle / MANIFEST
    if not mpath.is_file() or mpath.is_symlink():
        report.problems.append(
            f"{MANIFEST}: missing; this is not a sealed bundle (or sealing did not finish)"
        )
        return
    if mpath.stat().st_size > ident.MAX_MANIFEST_BYTES:
        report.problems.append(f"{MANIFEST}: {mpath.stat().st_size} bytes, more than any bundle needs")
        return
    raw = mpath.read_bytes()
    try:
        manifest = ident.parse(raw)
    except FtError as exc:
        report.problems.append(exc.message)
        return
    if shape := manifest_problems(manifest):
        report.problems.extend(shape)
        return
    report.manifest = manifest
    report.identity = ident.digest(raw)
    _check_signature(bundle, report, key)

    listed = {e["path"]: e for e in manifest["files"]}
    changed, missing, readme = _check_listed(bundle, report, listed)
    extra = _check_unlisted(bundle, listed, missing)
    if README not in listed:
        changed.append(f"{README}: not listed in {MANIFEST}; every ft bundle carries one with its identity")
    report.problems += changed
    report.problems += [
        f"{p}: missing"
        + (f" (renamed to {e['renamed_to']}?)" if "renamed_to" in e else f" (listed in {MANIFEST})")
        for p, e in sorted(missing.items())
    ]
    report.problems += [extra[r] for r in sorted(extra)]
    report.problems += readme  # after the files: a changed file also changes the identity the README names
    _check_sidecar(report)
    _check_verdict(bundle, report, listed)


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


def _require_signature(report: VerifyReport, key: Path | None) -> None:
    if report.signed or not report.ok:
        return
    if not report.signature_present:
        report.problems.append(f"{SIGNATURE}: missing; --require-signature refuses an unsigned bundle")
    elif key is None:
        report.problems.append(
            f"{SIGNATURE}: not checked; --require-signature needs the signer's public key (--key PUBLIC.pem)"
        )


def open_bundle(
    path: Path, work_dir: Path | None = None, *, key: Path | None = None, require_signature: bool = False
) -> tuple[Path, VerifyReport]:
    """Verify `path` (directory or archive) and return the verified bundle directory.

    An archive is safely extracted into `work_dir` (new or empty; a fresh temporary directory when None)
    which the caller owns. Raises BundleError (an FtError) when verification fails, after removing
    whatever it extracted.
    """
    path = Path(path)
    report = VerifyReport(path=path)
    if key is not None:  # a bad key file is the user's error, not the bundle's: raised as is
        report.key_fingerprint = signing.fingerprint(Path(key))
    if path.is_dir():
        _check_dir(path, report, key)
    elif path.is_file():
        existed = work_dir is not None and Path(work_dir).exists()
        target = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="ft-bundle-"))
        try:
            safe_extract(path, target, limits=archive_limits)
        except FtError as exc:
            report.problems.append(exc.message.removeprefix(f"{path}: "))
        else:
            _check_dir(_bundle_root(target, report), report, key)
        if not report.ok or require_signature and not report.signed:
            _remove(target, keep_dir=existed)  # worthless now: leave nothing of it behind
    else:
        raise FtError(f"{path}: no such bundle directory or archive")
    if require_signature:
        _require_signature(report, key)
    if not report.ok:
        raise BundleError(report)
    return report.bundle_dir, report


def _remove(target: Path, *, keep_dir: bool) -> None:
    if not keep_dir:
        shutil.rmtree(target, ignore_errors=True)
        return
    for child in target.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def verify(
    path: Path, *, key: Path | None = None, require_signature: bool = False, raise_on_failure: bool = True
) -> VerifyReport:
    """Recompute every file of a bundle directory or .tar.gz against its MANIFEST (and signature with `key`).

    An archive is extracted into a temporary directory that is removed afterwards. A failure raises
    BundleError, whose one-line message names the first problem; pass `raise_on_failure=False` to get
    the report back instead. `require_signature` makes an unsigned or unchecked signature a failure.
    """
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="ft-verify-") as tmp:
        try:
            _, report = open_bundle(
                path, None if path.is_dir() else Path(tmp) / "x", key=key, require_signature=require_signature
            )
        except BundleError as exc:
            if raise_on_failure:
                raise
            report = exc.report
    if not path.is_dir():
        report.bundle_dir = None  # it lived in the temporary directory, now gone
    return report
