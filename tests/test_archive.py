"""Bundle archives: written byte-for-byte reproducibly, and never unpacked outside their target."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from ft.bundle import BundleError, verify
from ft.bundle.archive import safe_extract, write_tar_gz
from ft.errors import FtError


def _info(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", linkname: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info, (io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def make_archive(path: Path, *entries: tuple) -> Path:
    """A .tar.gz whose first entry is harmless, so we can see that nothing at all gets extracted."""
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(*_info("bundle/MANIFEST.json", data=b"{}"))
        for info, fileobj in entries:
            tar.addfile(info, fileobj)
    return path


MALICIOUS = {
    "absolute path": lambda out: _info(str(out / "abs.txt"), data=b"pwned"),
    "dot-dot traversal": lambda out: _info("../outside/escape.txt", data=b"pwned"),
    "nested dot-dot": lambda out: _info("bundle/a/../../../outside/escape.txt", data=b"pwned"),
    "symlink out": lambda out: _info("bundle/link", tarfile.SYMTYPE, linkname=str(out)),
    "symlink relative": lambda out: _info("bundle/link", tarfile.SYMTYPE, linkname="../../outside"),
    "hard link out": lambda out: _info("bundle/hl", tarfile.LNKTYPE, linkname="/etc/passwd"),
    "hard link inside": lambda out: _info("bundle/hl", tarfile.LNKTYPE, linkname="bundle/MANIFEST.json"),
    "character device": lambda out: _info("bundle/null", tarfile.CHRTYPE),
    "block device": lambda out: _info("bundle/sda", tarfile.BLKTYPE),
    "fifo": lambda out: _info("bundle/pipe", tarfile.FIFOTYPE),
    "windows drive": lambda out: _info("C:evil.txt", data=b"pwned"),
    "duplicate entry": lambda out: _info("bundle/MANIFEST.json", data=b"{}"),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_archive_is_rejected_and_nothing_is_written(tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = make_archive(tmp_path / "evil.tar.gz", MALICIOUS[case](outside))
    parent = tmp_path / "parent"
    target = parent / "target"
    with pytest.raises(FtError, match="nothing was extracted"):
        safe_extract(archive, target)
    assert list(parent.iterdir()) == [target], "nothing beside the target"
    assert list(target.iterdir()) == [], "nothing inside it either: all-or-nothing"
    assert list(outside.iterdir()) == [], "nothing outside"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar.gz", "outside", "parent"]


@pytest.mark.parametrize("case", ["dot-dot traversal", "symlink out", "hard link out", "fifo"])
def test_verify_rejects_malicious_archives_with_one_line(tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = make_archive(tmp_path / "evil.tar.gz", MALICIOUS[case](outside))
    with pytest.raises(BundleError, match="unsafe entry|duplicate entry") as exc:
        verify(archive)
    assert "\n" not in str(exc.value)
    assert list(outside.iterdir()) == []


def test_not_an_archive(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"this is not gzip")
    with pytest.raises(FtError, match="not a readable"):
        safe_extract(junk, tmp_path / "t")
    with pytest.raises(BundleError, match="not a readable"):
        verify(junk)


def test_truncated_archive_leaves_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(bytes(range(256)) * 4000)
    archive = write_tar_gz(src, tmp_path / "ok.tar.gz", root="b")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(FtError):
        safe_extract(cut, tmp_path / "t")
    assert list((tmp_path / "t").iterdir()) == []


def test_target_must_be_empty(tmp_path):
    archive = make_archive(tmp_path / "a.tar.gz")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x").write_text("")
    with pytest.raises(FtError, match="not empty"):
        safe_extract(archive, tmp_path / "t")


def test_round_trip_and_determinism(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.json").write_text("{}")
    (src / "sub" / "b.json").chmod(0o600)
    first = write_tar_gz(src, tmp_path / "1.tar.gz", root="bundle", mtime=1234)
    (src / "a.txt").touch()  # a newer file time changes nothing
    second = write_tar_gz(src, tmp_path / "2.tar.gz", root="bundle", mtime=1234)
    assert first.read_bytes() == second.read_bytes()
    assert oct(first.stat().st_mode & 0o777) == oct(0o644)
    out = safe_extract(first, tmp_path / "x")
    assert (out / "bundle" / "a.txt").read_text() == "a"
    assert (out / "bundle" / "sub" / "b.json").read_text() == "{}"
    with tarfile.open(first) as tar:
        assert tar.getnames() == ["bundle", "bundle/a.txt", "bundle/sub", "bundle/sub/b.json"]
        assert {m.mtime for m in tar.getmembers()} == {1234}


def test_write_refuses_special_files_and_leaves_no_temp(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok").write_text("")
    (src / "link").symlink_to("/etc/hostname")
    with pytest.raises(FtError, match="not a regular file"):
        write_tar_gz(src, tmp_path / "out" / "b.tar.gz", root="b")
    assert list((tmp_path / "out").iterdir()) == []
