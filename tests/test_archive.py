"""Bundle archives: written byte-for-byte reproducibly, and never unpacked outside their target."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from ft.bundle import BundleError, open_bundle, verify
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


# ---------------------------------------------------------------- bombs and ambiguous names (issue 9.3)

GiB = 2**30


def _header(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode = size, kind, 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def _canonical(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=True) + "\n").encode()


def make_bomb(path: Path, size: int = GiB, *, manifest_first: bool = True, name: str = "zeros.bin") -> Path:
    """A ~1 MB .tar.gz holding `size` bytes of zeros in b/data/zeros.bin, whose manifest declares 1 KiB.

    gzip allows concatenated members, so one compressed 16 MiB block of zeros repeated builds it at once.
    """
    manifest = _canonical(
        {
            "format": "ft-bundle/2",
            "run": "b",
            "verdict": "KEEP",
            "files": [
                {"path": "data/zeros.bin", "sha256": hashlib.sha256(bytes(1024)).hexdigest(), "bytes": 1024}
            ],
        }
    )
    head = _header("b", kind=tarfile.DIRTYPE)
    manifest_entry = _header("b/MANIFEST.json", len(manifest)) + _padded(manifest)
    bomb_header = _header("b/data", kind=tarfile.DIRTYPE) + _header(f"b/data/{name}", size)
    block = 2**24
    assert size % block == 0
    with open(path, "wb") as out:
        if manifest_first:
            out.write(gzip.compress(head + manifest_entry + bomb_header))
        else:
            out.write(gzip.compress(head + bomb_header))
        zeros = gzip.compress(bytes(block), compresslevel=9)
        for _ in range(size // block):
            out.write(zeros)
        out.write(gzip.compress((b"" if manifest_first else manifest_entry) + bytes(1024)))
    return path


def _disk_usage(root: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file()) if root.exists() else 0


@pytest.fixture
def written(monkeypatch):
    """Counts every byte the extractor writes for an archive member, and forbids tarfile's own writer."""
    from ft.bundle import archive

    total = [0]
    real = getattr(archive, "_copy_bounded", None)

    def counting(src, dest, limit):
        n = real(src, dest, limit)
        total[0] += n
        return n

    def forbidden(*a, **k):
        raise AssertionError("tarfile wrote a member itself, unbounded")

    if real is not None:
        monkeypatch.setattr(archive, "_copy_bounded", counting)
    monkeypatch.setattr(tarfile.TarFile, "makefile", forbidden)
    return total


def test_gzip_bomb_is_refused_from_its_header_and_nothing_is_written(tmp_path, written):
    bomb = make_bomb(tmp_path / "bomb.tar.gz")
    assert bomb.stat().st_size < 1.5 * 2**20, "a ~1 MB archive..."
    work = tmp_path / "work"
    with pytest.raises(
        BundleError, match=r"zeros.bin' holds 1073741824 bytes, but MANIFEST.json declares 1024"
    ):
        open_bundle(bomb, work)
    assert written[0] < 4 * 2**20
    assert _disk_usage(work) < 4 * 2**20 and not (work.exists() and any(work.iterdir()))


def test_bomb_before_its_manifest_is_refused_before_writing(tmp_path, written):
    bomb = make_bomb(tmp_path / "late.tar.gz", 64 * 2**20, manifest_first=False)
    with pytest.raises(BundleError, match="holds 67108864 bytes, but MANIFEST.json declares 1024"):
        verify(bomb)
    assert written[0] == 0


def test_unlisted_bomb_is_refused_by_the_manifest_total(tmp_path, written):
    bomb = make_bomb(tmp_path / "unlisted.tar.gz", 64 * 2**20, name="not-in-the-manifest.bin")
    with pytest.raises(BundleError, match="more than the .* MANIFEST.json accounts for"):
        verify(bomb)
    assert written[0] == 0


def test_writer_stops_at_the_declared_size(tmp_path):
    from ft.bundle import archive

    with pytest.raises(archive._Refused, match="more data than its 10 declared bytes"):
        archive._copy_bounded(io.BytesIO(bytes(11)), tmp_path / "f", 10)
    assert (tmp_path / "f").stat().st_size <= 10


def test_reproduce_leaves_nothing_behind_after_a_refused_archive(tmp_path, capsys, written):
    from ft.cli import main

    bomb = make_bomb(tmp_path / "bomb.tar.gz")
    work = tmp_path / "work"
    assert main(["reproduce", str(bomb), "--work", str(work)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "declares 1024" in err
    assert not work.exists(), "the work folder it created is gone"
    work.mkdir()
    assert main(["reproduce", str(bomb), "--work", str(work)]) == 2
    assert list(work.iterdir()) == [], "a work folder the user made is left, empty"


AMBIGUOUS = {
    "file then directory": [("bundle/x", tarfile.REGTYPE), ("bundle/x", tarfile.DIRTYPE)],
    "directory then file": [("bundle/x", tarfile.DIRTYPE), ("bundle/x", tarfile.REGTYPE)],
    "file then a path under it": [("bundle/x", tarfile.REGTYPE), ("bundle/x/y", tarfile.REGTYPE)],
    "path under a name, then that name as a file": [
        ("bundle/x/y", tarfile.REGTYPE),
        ("bundle/x", tarfile.REGTYPE),
    ],
    "duplicate directory": [("bundle/d", tarfile.DIRTYPE), ("bundle/d/", tarfile.DIRTYPE)],
    "duplicate file through ./": [("bundle/f", tarfile.REGTYPE), ("bundle/./f", tarfile.REGTYPE)],
}


@pytest.mark.parametrize("case", sorted(AMBIGUOUS))
def test_ambiguous_names_are_refused(tmp_path, case):
    entries = [
        _info(name, kind, data=b"x" if kind == tarfile.REGTYPE else b"") for name, kind in AMBIGUOUS[case]
    ]
    archive = make_archive(tmp_path / "amb.tar.gz", *entries)
    with pytest.raises(FtError, match="of the same name|duplicate entry") as exc:
        safe_extract(archive, tmp_path / "t")
    assert "nothing was extracted" in str(exc.value)
    assert list((tmp_path / "t").iterdir()) == []


def test_directory_entry_after_the_files_inside_it_is_fine(tmp_path):
    """Unsorted archives (GNU tar without --sort) may name a directory after what it holds."""
    archive = make_archive(
        tmp_path / "late-dirs.tar.gz",
        _info("bundle/sub/a.txt", data=b"a"),
        _info("bundle/sub", tarfile.DIRTYPE),
        _info("bundle", tarfile.DIRTYPE),
    )
    out = safe_extract(archive, tmp_path / "t")
    assert (out / "bundle" / "sub" / "a.txt").read_bytes() == b"a"
