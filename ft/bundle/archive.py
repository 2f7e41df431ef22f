"""Deterministic, safe .tar.gz for bundles.

Writing: the same directory always gives the same archive bytes (sorted entries, one fixed mtime,
uid/gid 0, no user or group names, modes 0644/0755, gzip header without name or time), so two people
who seal the same run can compare archives by hash.

Reading: a bundle arrives from someone else, so its archive is untrusted input. Every entry is checked
before anything is written: only regular files and directories, relative paths without `..`, nothing
that resolves outside the target, no duplicates. Python's own `filter="data"` is applied on top where
the interpreter has it. Extraction is all-or-nothing: one bad entry and nothing is extracted.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import tarfile
import tempfile
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
    dest = os.path.realpath(os.path.join(target, name))
    if os.path.commonpath([dest, str(target)]) != str(target):
        return "resolves outside the target directory"
    return None


def _extract_checked(archive: Path, target: Path) -> None:
    with tarfile.open(archive, mode="r:*") as tar:
        members = tar.getmembers()
        seen: set[str] = set()
        for member in members:  # check every entry before writing anything
            if problem := _entry_problem(member, target):
                raise FtError(f"{archive}: unsafe entry {member.name!r}: {problem}; nothing was extracted")
            norm = PurePosixPath(member.name).as_posix()
            if norm in seen and not member.isdir():
                raise FtError(f"{archive}: duplicate entry {member.name!r}; nothing was extracted")
            seen.add(norm)
        # Every entry passed our checks; Python's data filter is a second, independent guard.
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        for member in members:
            tar.extract(member, target, **extra)


def _empty(target: Path) -> None:
    for child in target.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                child.unlink()


def safe_extract(archive: Path, target: Path) -> Path:
    """Extract `archive` into `target` (new or empty) after checking every entry; returns `target`."""
    target.mkdir(parents=True, exist_ok=True)
    if any(target.iterdir()):
        raise FtError(f"{target}: extraction target is not empty")
    target = Path(os.path.realpath(target))
    try:
        _extract_checked(archive, target)
    except (tarfile.TarError, OSError, EOFError) as exc:
        _empty(target)
        raise FtError(f"{archive}: not a readable .tar.gz bundle ({exc}); nothing was extracted") from None
    except BaseException:
        _empty(target)
        raise
    return target
