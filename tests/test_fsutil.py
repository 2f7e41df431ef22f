"""Atomic writes: a failure leaves the previous good state and a clear message."""

from __future__ import annotations

import errno
import os

import pytest

from ft.errors import FtError
from ft.fsutil import atomic_dir, remove_stale_partials, write_json, write_text
from ft.secrets import MASK


def test_write_replaces_atomically_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    write_json(target, {"a": 2})
    assert target.read_text().strip().endswith("}")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_full_disk_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "report.md"
    write_text(target, "good")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(
        FtError, match="no space left on device while writing; the previous version is intact"
    ):
        write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    final = tmp_path / "bundle"
    with pytest.raises(RuntimeError), atomic_dir(final) as staging:
        (staging / "a").write_text("x")
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replace_keeps_old_until_new_is_complete(tmp_path):
    final = tmp_path / "adapter"
    with atomic_dir(final) as s:
        (s / "w").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(final, replace=True) as s:
        (s / "w").write_text("new")
        raise RuntimeError
    assert (final / "w").read_text() == "old"
    with atomic_dir(final, replace=True) as s:
        (s / "w").write_text("new")
    assert (final / "w").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_stale_partials_are_removed(tmp_path):
    (tmp_path / ".step-000010.abc.partial").mkdir()
    (tmp_path / ".x.json.123.tmp").write_text("half")
    (tmp_path / "step-000005").mkdir()
    removed = remove_stale_partials(tmp_path)
    assert len(removed) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["step-000005"]


def test_secrets_are_masked_in_everything_written(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_FAKEtoken1234567890")
    monkeypatch.setenv("WANDB_API_KEY", "wandb-fake-key-0987654321")
    write_json(tmp_path / "m.json", {"note": "token hf_FAKEtoken1234567890 and wandb-fake-key-0987654321"})
    text = (tmp_path / "m.json").read_text()
    assert "hf_FAKE" not in text and "wandb-fake" not in text and MASK in text


def test_a_write_error_elsewhere_names_the_file_that_failed(tmp_path):
    """A permission error in a cache or temp folder must not read as if the output folder were at fault."""
    from ft.fsutil import disk_error

    out = tmp_path / "exports"
    elsewhere = PermissionError(errno.EACCES, "Permission denied", "/cache/ft/llama-converter/x.py")
    assert str(disk_error(out, elsewhere)) == (
        f"{out}: could not write: Permission denied (/cache/ft/llama-converter/x.py)"
    )
    here = PermissionError(errno.EACCES, "Permission denied", str(out))
    assert str(disk_error(out, here)) == f"{out}: could not write: Permission denied"


def test_atomic_writes_get_the_umask_modes_not_mkstemps_private_ones(tmp_path):
    """The image unpacks llama.cpp's converter as root through atomic_dir; with mkdtemp's 0700 the
    container's user could not read it and `docker compose run export` failed."""
    import stat

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "tree") as staging:
            write_text(staging / "a.txt", "x")
        write_text(tmp_path / "b.txt", "y")
        private = tmp_path / "key.pem"
        from ft.fsutil import write_bytes

        write_bytes(private, b"secret", mode=0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "tree").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "tree" / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
