"""Deterministic, safe .tar.gz for bundles.

Writing: the same directory always gives the same archive bytes (sorted entries, one fixed mtime,
uid/gid 0, no user or group names, modes 0644/0755, gzip header without name or time), so two people
who seal the same run can compare archives by hash.

Reading: a bundle arrives from someone else, so its archive is untrusted input. Every entry header is
checked before anything is written: only regular files and directories, relative paths without `..`,
nothing that resolves outside the target, no name twice, no name used both as a file and a directory
(tarfile and GNU tar would each resolve that differently, so what `ft verify` checked would not be what
another tool unpacks). With `limits` (the bundle's MANIFEST.json, read from the archive first), no entry
may be larger than the manifest says and all of them together no larger than its sum: a 1 MB archive
holding 1 GB of zeros is refused from its headers, and the writer stops at the declared size as well.
Extraction is all-or-nothing: one bad entry, or any failure while writing, and the target is emptied.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ft.errors import FtError
from ft.fsutil import disk_error, fsync_dir

FILE_MODE = 0o644
DIR_MODE = 0o755
_ALLOWED_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE)


def _entries(src: Path) -> list[tuple[str, Path]]:
    """Every file under `src` and every directory that holds one, as (posix relpath, path)."""
    found: dict[str, Path] = {}
    for dirpath, dirs, files in os.walk(src):
        dirs.sort()
        # os.walk lists a symlinked directory among `dirs` without entering it; include it to refuse it.
        for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            path = Path(dirpath, name)
            rel = path.relative_to(src).as_posix()
            found[rel] = path
            parts = rel.split("/")
            for i in range(1, len(parts)):
                found.setdefault("/".join(parts[:i]), src.joinpath(*parts[:i]))
    return sorted(found.items(), key=lambda item: item[0].split("/"))


def write_tar_gz(src: Path, out: Path, *, root: str, mtime: int = 0) -> Path:
    """Pack `src` as `root/...` into `out` deterministically and atomically (temp sibling + rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            with (
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
            ):
                tar.add(src, arcname=root, recursive=False, filter=lambda ti: _normalise(ti, mtime))
                for rel, path in _entries(src):
                    info = _normalise(tar.gettarinfo(str(path), arcname=f"{root}/{rel}"), mtime)
                    if info.isdir():
                        tar.addfile(info)
                    elif info.isreg():
                        with open(path, "rb") as f:
                            tar.addfile(info, f)
                    else:
                        raise FtError(f"{path}: not a regular file; bundles hold only files and directories")
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, out)
    except OSError as exc:  # a full disk: one line, exit 2, and no half-written archive left behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise disk_error(out, exc) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(out.parent)
    return out


def _normalise(info: tarfile.TarInfo, mtime: int) -> tarfile.TarInfo:
    info.mtime = int(mtime)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = DIR_MODE if info.isdir() else FILE_MODE
    info.pax_headers = {}
    return info


def _entry_problem(member: tarfile.TarInfo, target: Path) -> str | None:
    """Why `member` must not be extracted into `target`, or None when it is safe."""
    name = member.name
    if not name or "\x00" in name or "\\" in name:
        return "empty name or one with NUL/backslash characters"
    if name.startswith("/") or PurePosixPath(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in PurePosixPath(name).parts:
        return "'..' path component"
    if member.issym():
        return f"symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "device file"
    if member.isfifo():
        return "FIFO"
    if member.type not in _ALLOWED_TYPES:
        return f"unsupported entry type {member.type!r}"
    if member.sparse is not None:
        return "sparse file"
    if PurePosixPath(name).as_posix() in ("", "."):
        return "names the target directory itself"
    dest = os.path.realpath(os.path.join(target, name))
    if os.path.commonpath([dest, str(target)]) != str(target):
        return "resolves outside the target directory"
    return None


# Most bytes per path (relative to the bundle root) and in all, from the raw MANIFEST.json; raises FtError.
Limits = Callable[[bytes], tuple[dict[str, int], int]]


@dataclass(frozen=True)
class _Entry:
    name: str  # normalised posix path inside the archive
    is_dir: bool
    size: int


class _Refused(Exception):
    """An entry or the archive breaks a rule; the message says which, without the archive's name."""


class _Scan:
    """Pass one over the headers: every safety rule, and the manifest's size limits, before any write."""

    def __init__(self, target: Path, limits: Limits | None, manifest_name: str):
        self.target, self.limits, self.manifest_name = target, limits, manifest_name
        self.entries: list[_Entry] = []
        self.kinds: dict[str, bool] = {}  # name -> is a directory (also for parents implied by a path)
        self.explicit: set[str] = set()  # names that had an entry of their own
        self.root: str | None = None  # "" when the manifest is at the top, else its one directory
        self.per_path: dict[str, int] | None = None
        self.total_limit: int | None = None
        self.total = 0
        self.manifest_error: str | None = None

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        if problem := _entry_problem(member, self.target):
            raise _Refused(f"unsafe entry {member.name!r}: {problem}")
        name = PurePosixPath(member.name).as_posix()
        is_dir = member.isdir()
        prior = self.kinds.get(name)  # True also for a directory only implied by an earlier path
        if name in self.explicit or (prior is True and not is_dir):
            what = "duplicate entry" if prior == is_dir else "a file and a directory of the same name"
            raise _Refused(f"{what} {member.name!r}")
        self.explicit.add(name)
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if self.kinds.setdefault(parent, True) is False:
                raise _Refused(f"a file and a directory of the same name {parent!r}")
        self.kinds[name] = is_dir
        entry = _Entry(name, is_dir, 0 if is_dir else member.size)
        self.entries.append(entry)
        if is_dir:
            return
        self.total += entry.size
        if self.limits is not None and self.root is None and self._is_manifest(name):
            self._read_limits(tar, member, name)
        self.check(entry)

    def _is_manifest(self, name: str) -> bool:
        return name == self.manifest_name or (
            name.count("/") == 1 and name.endswith("/" + self.manifest_name)
        )

    def _read_limits(self, tar: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> None:
        self.root = name[: -len(self.manifest_name)].rstrip("/")
        from ft.bundle.identity import MAX_MANIFEST_BYTES

        if member.size > MAX_MANIFEST_BYTES:
            raise _Refused(f"{name}: {member.size} bytes, more than any bundle manifest needs")
        raw = tar.extractfile(member).read()  # type: ignore[union-attr]
        try:
            self.per_path, self.total_limit = self.limits(raw)  # type: ignore[misc]
        except FtError as exc:  # reported after the scan, so that an unsafe entry is named first
            self.manifest_error = exc.message
            self.per_path, self.total_limit = {}, 0
            return
        for earlier in self.entries:
            self.check(earlier)

    def check(self, entry: _Entry) -> None:
        """Refuse as soon as one entry or the running total is larger than the manifest allows."""
        if self.per_path is None or entry.is_dir or self.manifest_error:
            return
        rel = entry.name.removeprefix(self.root + "/") if self.root else entry.name
        declared = self.per_path.get(rel)
        if declared is not None and entry.size > declared:
            raise _Refused(f"{entry.name!r} holds {entry.size} bytes, but MANIFEST.json declares {declared}")
        if self.total > (self.total_limit or 0):
            raise _Refused(
                f"its files hold {self.total} bytes, more than the {self.total_limit} MANIFEST.json accounts for"
            )

    def finish(self) -> None:
        if self.limits is None:
            return
        if self.root is None:
            raise _Refused(
                f"no {self.manifest_name} at its top or in its one top directory; not an ft bundle"
            )
        if self.manifest_error:
            raise _Refused(self.manifest_error)
        free = shutil.disk_usage(self.target).free
        if self.total > free:
            raise _Refused(f"needs {self.total} bytes but only {free} are free at {self.target}")


def _copy_bounded(src, dest: Path, limit: int) -> int:
    """Write `src` to a new file `dest`, stopping with _Refused past `limit` bytes; returns bytes written."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
    written = 0
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(1 << 20):
            if written + len(chunk) > limit:
                raise _Refused(f"{dest.name}: more data than its {limit} declared bytes")
            out.write(chunk)
            written += len(chunk)
    return written


def _write(archive: Path, target: Path, scan: _Scan) -> None:
    """Pass two: write exactly the entries pass one checked, each capped at its checked size."""
    expected = iter(scan.entries)
    budget = scan.total
    with tarfile.open(archive, mode="r:*") as tar:
        for member in tar:
            entry = next(expected, None)
            name = PurePosixPath(member.name).as_posix()
            if (
                entry is None
                or (entry.name, entry.is_dir) != (name, member.isdir())
                or (not entry.is_dir and member.size != entry.size)
            ):
                raise _Refused("changed while being read")
            dest = target.joinpath(*name.split("/"))
            if entry.is_dir:
                dest.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            src = tar.extractfile(member)
            if src is None:
                raise _Refused(f"unreadable entry {member.name!r}")
            budget -= _copy_bounded(src, dest, min(entry.size, budget))
        if next(expected, None) is not None:
            raise _Refused("changed while being read")


def _extract_checked(archive: Path, target: Path, limits: Limits | None, manifest_name: str) -> None:
    scan = _Scan(target, limits, manifest_name)
    with tarfile.open(archive, mode="r:*") as tar:
        for member in tar:  # headers one by one: a refusal stops before the rest is even decompressed
            scan.add(tar, member)
    scan.finish()
    _write(archive, target, scan)


def _empty(target: Path) -> None:
    for child in target.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                child.unlink()


def safe_extract(
    archive: Path, target: Path, *, limits: Limits | None = None, manifest_name: str = "MANIFEST.json"
) -> Path:
    """Extract `archive` into `target` (new or empty) after checking every entry; returns `target`.

    With `limits`, the archive must hold `manifest_name` at its top or in its one top directory, and
    `limits(its bytes)` gives the most bytes each path (relative to that directory) and all files may hold.
    """
    target.mkdir(parents=True, exist_ok=True)
    if any(target.iterdir()):
        raise FtError(f"{target}: extraction target is not empty")
    target = Path(os.path.realpath(target))
    try:
        try:
            _extract_checked(archive, target, limits, manifest_name)
        except _Refused as exc:
            raise FtError(f"{archive}: {exc}; nothing was extracted") from None
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise FtError(
                f"{archive}: not a readable .tar.gz bundle ({exc}); nothing was extracted"
            ) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise FtError(
                    f"{target}: no space left on device while extracting {archive}; nothing was kept"
                ) from None
            raise FtError(f"{archive}: cannot extract ({exc}); nothing was extracted") from None
    except BaseException:
        _empty(target)
        raise
    return target
