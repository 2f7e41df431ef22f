"""Atomic writes and hashing.

Every file and directory ft produces is written to a temporary sibling, flushed to disk and renamed
into place, so a crash or a full disk leaves the previous good state intact and never a half-written
output. A directory is complete only once its marker (or manifest) has been written last.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ft.errors import FtError

CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (POSIX needs the directory itself synced)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# Below this much free space, a failed write is taken to be a full disk (see `is_disk_full`).
LOW_SPACE = 4 << 20


def is_disk_full(exc: BaseException, where: str | os.PathLike) -> bool:
    """Whether `exc`, raised by any writer, means the disk filled up.

    Native writers do not all raise OSError(ENOSPC): safetensors raises a SafetensorError whose text
    names os error 28, and torch.save an opaque RuntimeError from its zip writer. So also read the
    text, and as a last resort ask the filesystem at `where` (check before freeing the partial output).
    """
    seen: BaseException | None = exc
    for _ in range(8):  # the cause/context chain, without trusting it to be acyclic
        if seen is None:
            break
        text = str(seen)
        if (
            getattr(seen, "errno", None) == errno.ENOSPC
            or "No space left on device" in text
            or "os error 28" in text
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(where).free < LOW_SPACE
    except OSError:
        return False


def disk_error(path: Path, exc: BaseException, *, full: bool | None = None) -> FtError:
    """The one-line error for a write to `path` that failed with `exc` (`full`: already known to be ENOSPC)."""
    if full or (full is None and getattr(exc, "errno", None) == errno.ENOSPC):
        return FtError(f"{path}: no space left on device while writing; the previous version is intact")
    reason = getattr(exc, "strerror", None) or exc
    # The OSError may come from a file elsewhere (a cache, a temporary folder): name it, or the user
    # goes looking in the wrong place.
    culprit = getattr(exc, "filename", None)
    if culprit and Path(str(culprit)) != Path(path):
        return FtError(f"{path}: could not write: {reason} ({culprit})")
    return FtError(f"{path}: could not write: {reason}")


def umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask can only set it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> Path:
    """Write `data` to `path` atomically: temp sibling, fsync, rename, fsync the directory.

    The file gets `mode`, else what open() would give it under the umask (mkstemp's 0600 would make
    the files of a bundle or an image unreadable to everyone but their writer)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode if mode is not None else 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise disk_error(path, exc) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    from ft.secrets import redact

    return write_bytes(path, redact(text).encode("utf-8"))


def dumps_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False, default=str) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, dumps_json(obj))


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Build a directory in a hidden staging sibling and rename it to `final` when the block succeeds.

    On any error the staging directory is removed and `final` is untouched. With `replace=True` an
    existing `final` is swapped out only after the new one is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not replace:
        raise FtError(f"{final}: already exists; choose another output or remove it")
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield staging
        fsync_tree(staging)
        os.chmod(staging, 0o777 & ~umask())  # mkdtemp's 0700 would hide it from every other user
        if not replace:
            # Someone else may have made `final` meanwhile (two processes building one cache entry): the
            # rename refuses a non-empty target, so theirs is never swapped out from under a reader.
            try:
                os.rename(staging, final)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise FtError(f"{final}: already exists; choose another output or remove it") from None
                raise
        elif final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
        fsync_dir(final.parent)
    except Exception as exc:
        # Reported against `final` (the path the user knows, not the staging one), also when a write
        # inside the block already said so. A native writer (safetensors, torch.save) on a full disk
        # does not raise OSError; look before the staging directory is removed, while it is still full.
        inner = exc.__cause__ if isinstance(exc, FtError) and isinstance(exc.__cause__, OSError) else exc
        full = not isinstance(inner, FtError) and is_disk_full(inner, final.parent)
        shutil.rmtree(staging, ignore_errors=True)
        if full or isinstance(inner, OSError):
            raise disk_error(final, inner, full=full) from inner
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_stale_partials(parent: str | os.PathLike) -> list[Path]:
    """Remove staging directories/files left by a process killed mid-write; returns what was removed."""
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        if p.name.startswith(".") and (p.name.endswith(".partial") or p.name.endswith(".tmp")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
            removed.append(p)
    return removed
