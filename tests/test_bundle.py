"""Sealing a run and verifying the bundle: every kind of tampering is caught and names the file."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import tarfile
import zipfile
from datetime import datetime
from pathlib import Path

import pytest

from ft import bundle
from ft.bundle import BundleError, identity, package, pickle_problem, signing, verify
from ft.errors import FtError

ENDED = "2026-11-02T10:20:30Z"


def safetensors_bytes(header_len: int | None = None) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    if header_len is not None:
        header = header.ljust(header_len, b" ")
    return struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1.0, 2.0)


def make_run(root: Path, name: str = "demo-run", *, status: str = "complete", report: bool = True) -> Path:
    """A small fabricated run directory shaped like the real one."""
    data = root / "data" / "train.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "{}"}]}\n'
    )
    run = root / "runs" / name
    (run / "adapter").mkdir(parents=True)
    (run / "eval").mkdir()
    (run / "checkpoints" / "step-000050").mkdir(parents=True)
    (run / "checkpoints" / "step-000050" / "optimizer.pt").write_bytes(pickle.dumps({"never": "bundled"}, 4))
    (run / "recipe.resolved.yaml").write_text(
        "name: demo\ndescription: strict JSON extraction\nmodel:\n  name_or_path: builtin:tiny-qwen2\n"
    )
    env = {
        "python": "3.11.7",
        "os": "Linux 6.1",
        "gpu": {
            "devices": [{"name": "NVIDIA H100"}],
            "driver": "580.1",
            "cuda_runtime": "12.8",
            "cudnn": "91000",
        },
        "packages": {"torch": "2.13.0", "transformers": "5.17.0", "peft": "0.21.2", "trl": "1.14.2"},
        "lockfile": {"name": "cpu.txt", "sha256": "ab" * 32},
        "image": {"id": "sha256:feedbeef"},
        "git_commit": "0123abcd",
    }
    (run / "env.json").write_text(json.dumps(env))
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    files = [
        {"name": "train.jsonl", "path": str(data), "sha256": sha, "bytes": data.stat().st_size, "rows": 1}
    ]
    (run / "data.json").write_text(json.dumps({"files": files}))
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.5}\n')
    run_json = {
        "name": name,
        "status": status,
        "recipe_sha256": "cd" * 32,
        "data_sha256": sha,
        "backend": "hf",
    }
    (run / "run.json").write_text(json.dumps({**run_json, "ended": ENDED}))
    (run / "adapter" / "adapter_config.json").write_text('{"r": 16}')
    (run / "adapter" / "adapter_model.safetensors").write_bytes(safetensors_bytes())
    (run / "adapter" / "tokenizer.json").write_text('{"model": {}}')
    (run / "adapter" / "ft-adapter.json").write_text('{"env": "../env.json"}')
    if report:
        rep = {
            "decision": {"verdict": "KEEP", "reasons": ["exact_match improved by 0.60"]},
            "metrics": {
                "base": {"exact_match": 0.1, "json_valid": 0.2},
                "tuned": {"exact_match": 0.7, "json_valid": 1.0},
            },
            "env_sha256": "ef" * 32,
        }
        (run / "eval" / "report.json").write_text(json.dumps(rep))
    (run / "eval" / "report.md").write_text("# Evaluation\n")
    (run / "eval" / "predictions.jsonl").write_text('{"id": 1}\n')
    (run / "eval" / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(32)))
    (run / "decision.md").write_text("# KEEP\n")
    return run


@pytest.fixture(scope="module")
def sealed(tmp_path_factory) -> Path:
    """One bundle (with data) shared read-only; tamper tests work on copies."""
    root = tmp_path_factory.mktemp("sealed")
    return package(make_run(root), root / "bundles", include_data=True)


@pytest.fixture
def copy(sealed, tmp_path) -> Path:
    return Path(shutil.copytree(sealed, tmp_path / sealed.name))


def listed(bundle_dir: Path) -> list[str]:
    return [e["path"] for e in json.loads((bundle_dir / "MANIFEST.json").read_text())["files"]]


def write_manifest(bundle_dir: Path, manifest: dict, *, reseal: bool = False) -> None:
    """Write an edited manifest in canonical form; `reseal` also rewrites the identity in README and sidecar,
    as someone re-sealing a bundle by hand would."""
    raw = identity.canonical(manifest)
    (bundle_dir / "MANIFEST.json").write_bytes(raw)
    if reseal:
        new = identity.digest(raw)
        readme = bundle_dir / "README.md"
        body = readme.read_text().splitlines(keepends=True)[:-1]
        readme.write_text("".join(body) + identity.readme_line(new))
        identity.sidecar_path(bundle_dir).write_text(identity.sidecar_text(new, bundle_dir.name))


def fails_naming(path: Path, name: str, *, key: Path | None = None, require_signature: bool = False) -> str:
    with pytest.raises(BundleError) as exc:
        verify(path, key=key, require_signature=require_signature)
    message = str(exc.value)
    assert name in message, message
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- package and verify


def test_package_then_verify_directory_and_archive(tmp_path):
    run = make_run(tmp_path)
    out = package(run, tmp_path / "bundles")
    assert out == tmp_path / "bundles" / "demo-run"
    archive = tmp_path / "bundles" / "demo-run.tar.gz"
    assert archive.is_file()
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert (
        manifest["format"] == "ft-bundle/2"
        and manifest["run"] == "demo-run"
        and manifest["verdict"] == "KEEP"
    )
    assert manifest["created"] == ENDED
    assert manifest["recipe_sha256"] == "cd" * 32
    assert manifest["env_sha256"] == hashlib.sha256((out / "env.json").read_bytes()).hexdigest()
    paths = [e["path"] for e in manifest["files"]]
    assert paths == sorted(paths)
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted(paths + ["MANIFEST.json"]) == on_disk
    assert not any(p.startswith(("checkpoints", "data/")) for p in paths)
    for entry in manifest["files"]:
        blob = (out / entry["path"]).read_bytes()
        if (
            entry["path"] == "README.md"
        ):  # listed without its last line, the identity (see ft.bundle.identity)
            blob = blob[: blob.rindex(b"\n", 0, -1) + 1]
        assert hashlib.sha256(blob).hexdigest() == entry["sha256"]
        assert len(blob) == entry["bytes"]

    for target in (out, archive):
        report = verify(target)
        assert report.ok and report.problems == [] and not report.signed
        assert report.files_checked == len(paths)
        assert report.render().startswith("OK: ")
    assert not list((tmp_path / "bundles").glob(".*")), "no staging leftovers"


def test_readme_tells_what_it_is_and_how_to_verify_and_rerun(sealed):
    text = (sealed / "README.md").read_text()
    for expected in (
        "demo-run",
        "strict JSON extraction",
        "builtin:tiny-qwen2",
        "Verdict: KEEP",
        "exact_match",
        "0.1000",
        "0.7000",
        "ft verify demo-run.tar.gz",
        "ft reproduce demo-run.tar.gz",
        "docker compose run",
        "NVIDIA H100",
        "580.1",
        "torch 2.13.0",
        "sha256:feedbeef",
        "ab" * 32,
        "0123abcd",
    ):
        assert expected in text, expected


def test_render_package_says_where_and_how_to_verify(sealed):
    text = bundle.render_package(sealed)
    assert str(sealed) in text and "demo-run.tar.gz" in text and "ft verify" in text and "KEEP" in text


def test_archive_is_deterministic(tmp_path):
    run = make_run(tmp_path)
    a = package(run, tmp_path / "one")
    b = package(run, tmp_path / "two")
    os.utime(run / "run.json", (0, 0))  # file times in the run must not leak into the archive
    c = package(run, tmp_path / "three")
    blobs = {(p.parent / f"{p.name}.tar.gz").read_bytes() for p in (a, b, c)}
    assert len(blobs) == 1
    blob = blobs.pop()
    assert blob[4:8] == b"\0\0\0\0", "gzip header mtime is zero"
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[0] == "demo-run" and "demo-run/MANIFEST.json" in names
    assert names == sorted(names, key=lambda n: n.split("/"))
    for m in members:
        assert (m.uid, m.gid, m.uname, m.gname) == (0, 0, "", "")
        assert m.mode == (0o755 if m.isdir() else 0o644)
        assert m.mtime == int(datetime.fromisoformat(ENDED.replace("Z", "+00:00")).timestamp())  # not now


def test_incomplete_runs_are_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "bundles"
    running = make_run(tmp_path / "a", status="running")
    with pytest.raises(FtError, match="status is 'running'"):
        package(running, out)
    unevaluated = make_run(tmp_path / "b", report=False)
    with pytest.raises(FtError, match="eval/report.json"):
        package(unevaluated, out)
    no_run_json = make_run(tmp_path / "c")
    (no_run_json / "run.json").unlink()
    with pytest.raises(FtError, match="no run.json"):
        package(no_run_json, out)
    no_adapter = make_run(tmp_path / "d")
    shutil.rmtree(no_adapter / "adapter")
    with pytest.raises(FtError, match="adapter"):
        package(no_adapter, out)
    assert not out.exists() or not any(out.iterdir())


def test_existing_output_is_not_overwritten(tmp_path):
    run = make_run(tmp_path)
    package(run, tmp_path / "out", archive=False)
    with pytest.raises(FtError, match="already exists"):
        package(run, tmp_path / "out")


def test_failure_while_sealing_leaves_nothing_half_written(tmp_path, monkeypatch):
    run = make_run(tmp_path)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bundle, "render_readme", boom)
    with pytest.raises((FtError, OSError)):
        package(run, tmp_path / "out")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------- pickles


@pytest.mark.parametrize("name", ["extra.bin", "state.pt", "model.pth", "x.pkl", "y.pickle", "last.ckpt"])
def test_pickle_suffixes_are_refused(tmp_path, name):
    run = make_run(tmp_path)
    (run / "adapter" / name).write_bytes(b"anything")
    with pytest.raises(FtError, match="pickle"):
        package(run, tmp_path / "out")
    assert not (tmp_path / "out" / "demo-run").exists()


def test_pickle_content_is_refused_whatever_its_name(tmp_path):
    run = make_run(tmp_path)
    (run / "eval" / "state.json").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(FtError, match="pickle protocol 4"):
        package(run, tmp_path / "out")


def test_torch_save_zip_is_refused(tmp_path):
    run = make_run(tmp_path)
    with zipfile.ZipFile(run / "adapter" / "weights.safetensors", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps([1], protocol=2))
    with pytest.raises(FtError, match="data.pkl"):
        package(run, tmp_path / "out")


def test_safetensors_whose_header_looks_like_pickle_is_allowed(tmp_path):
    blob = safetensors_bytes(header_len=0x0280)  # first bytes 0x80 0x02: the pickle protocol 2 header
    assert blob[:2] == b"\x80\x02"
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(blob)
    assert pickle_problem(path) is None


def test_checkpoint_pickles_are_never_bundled(sealed):
    assert not (sealed / "checkpoints").exists()


def test_verify_flags_a_resealed_pickle(copy):
    (copy / "adapter" / "evil.json").write_bytes(pickle.dumps(1, protocol=3))
    manifest = json.loads((copy / "MANIFEST.json").read_text())
    blob = (copy / "adapter" / "evil.json").read_bytes()
    manifest["files"].append(
        {"path": "adapter/evil.json", "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    )
    manifest["files"].sort(key=lambda e: e["path"])
    write_manifest(copy, manifest, reseal=True)
    fails_naming(copy, "adapter/evil.json: a pickle")


# ---------------------------------------------------------------- data


def test_include_data_copies_and_hashes_the_data(sealed):
    data_json = json.loads((sealed / "data.json").read_text())
    expected = data_json["files"][0]["sha256"]
    entry = next(
        e
        for e in json.loads((sealed / "MANIFEST.json").read_text())["files"]
        if e["path"] == "data/train.jsonl"
    )
    assert (
        entry["sha256"]
        == expected
        == hashlib.sha256((sealed / "data" / "train.jsonl").read_bytes()).hexdigest()
    )
    assert json.loads((sealed / "MANIFEST.json").read_text())["data_included"] is True


def test_data_files_are_found_by_hash_when_moved(tmp_path):
    run = make_run(tmp_path)
    moved = tmp_path / "elsewhere.jsonl"
    shutil.move(tmp_path / "data" / "train.jsonl", moved)
    out = package(run, tmp_path / "out", data_files=[moved], archive=False)
    assert (out / "data" / "train.jsonl").read_bytes() == moved.read_bytes()
    assert verify(out).ok


def test_builtin_data_named_as_written_is_bundled(tmp_path):
    """data.json as ft.data writes it: `name` as the user wrote it (here a built-in file), no `path`."""
    from ft.config import builtin_data_path

    run = make_run(tmp_path)
    src = builtin_data_path("tickets.jsonl")
    blob = src.read_bytes()
    entry = {"role": "train", "name": "builtin:tickets.jsonl", "sha256": hashlib.sha256(blob).hexdigest()}
    (run / "data.json").write_text(json.dumps({"format": "ft-data/1", "files": [entry]}))
    out = package(run, tmp_path / "out", include_data=True, archive=False)
    assert (out / "data" / "tickets.jsonl").read_bytes() == blob
    assert verify(out).ok


def test_changed_data_is_refused(tmp_path):
    run = make_run(tmp_path)
    with open(tmp_path / "data" / "train.jsonl", "a") as f:
        f.write("\n")
    with pytest.raises(FtError, match="does not match data.json"):
        package(run, tmp_path / "out", include_data=True)
    assert not (tmp_path / "out" / "demo-run").exists()


def test_given_data_file_not_in_data_json_is_refused(tmp_path):
    run = make_run(tmp_path)
    stranger = tmp_path / "other.jsonl"
    stranger.write_text("{}\n")
    with pytest.raises(FtError, match="none of the given data files"):
        package(run, tmp_path / "out", data_files=[stranger])


# ---------------------------------------------------------------- tampering

BUNDLE_FILES = [
    "adapter/adapter_model.safetensors",
    "adapter/adapter_config.json",
    "adapter/tokenizer.json",
    "adapter/ft-adapter.json",
    "recipe.resolved.yaml",
    "env.json",
    "data.json",
    "metrics.jsonl",
    "run.json",
    "eval/report.json",
    "eval/report.md",
    "eval/predictions.jsonl",
    "eval/loss.png",
    "decision.md",
    "README.md",
    "data/train.jsonl",
]


def test_tamper_list_covers_every_bundled_file(sealed):
    assert sorted(BUNDLE_FILES) == sorted(listed(sealed))


@pytest.mark.parametrize("rel", BUNDLE_FILES)
def test_one_changed_byte_in_any_file_fails_naming_it(copy, rel):
    path = copy / rel
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))
    message = fails_naming(copy, rel)
    assert "content changed" in message


def test_appended_byte_fails_as_size_change(copy):
    with open(copy / "adapter" / "adapter_model.safetensors", "ab") as f:
        f.write(b"\0")
    assert "size changed" in fails_naming(copy, "adapter/adapter_model.safetensors")


def test_truncated_file_fails(copy):
    (copy / "eval" / "predictions.jsonl").write_bytes(b"")
    fails_naming(copy, "eval/predictions.jsonl")


def test_changed_hash_inside_manifest_fails_naming_the_file(copy):
    text = (copy / "MANIFEST.json").read_text()
    manifest = json.loads(text)
    entry = next(e for e in manifest["files"] if e["path"] == "env.json")
    flipped = entry["sha256"][:-1] + ("0" if entry["sha256"][-1] != "0" else "1")
    (copy / "MANIFEST.json").write_text(text.replace(entry["sha256"], flipped))
    fails_naming(copy, "env.json: content changed")


def test_manifest_not_json_fails(copy):
    blob = bytearray((copy / "MANIFEST.json").read_bytes())
    blob[0] = ord("[") if blob[0] != ord("[") else ord("{")
    blob[1] = ord("x")
    (copy / "MANIFEST.json").write_bytes(bytes(blob))
    fails_naming(copy, "MANIFEST.json: not valid JSON")


def test_manifest_wrong_format_fails(copy):
    manifest = json.loads((copy / "MANIFEST.json").read_text())
    manifest["format"] = "ft-bundle/99"
    write_manifest(copy, manifest)
    fails_naming(copy, "MANIFEST.json: format")


def test_manifest_escaping_path_fails(copy):
    manifest = json.loads((copy / "MANIFEST.json").read_text())
    manifest["files"][0]["path"] = "../outside.txt"
    write_manifest(copy, manifest)
    fails_naming(copy, "'..'")


def test_missing_manifest_fails(copy):
    (copy / "MANIFEST.json").unlink()
    fails_naming(copy, "MANIFEST.json: missing")


def test_missing_file_fails_naming_it(copy):
    (copy / "eval" / "loss.png").unlink()
    assert "missing" in fails_naming(copy, "eval/loss.png")


def test_extra_file_fails_naming_it(copy):
    (copy / "notes.txt").write_text("added later\n")
    assert "extra file" in fails_naming(copy, "notes.txt")


def test_extra_file_in_subdirectory_fails(copy):
    (copy / "adapter" / "bonus.safetensors").write_bytes(safetensors_bytes())
    fails_naming(copy, "adapter/bonus.safetensors")


@pytest.mark.parametrize("rel", [".hidden", "adapter/.DS_Store", ".git/config"])
def test_extra_hidden_file_fails(copy, rel):
    (copy / rel).parent.mkdir(parents=True, exist_ok=True)
    (copy / rel).write_text("x")
    fails_naming(copy, rel)


def test_extra_empty_directory_fails(copy):
    (copy / "eval" / "more").mkdir()
    fails_naming(copy, "eval/more/: extra directory")


def test_extra_symlink_fails(copy):
    (copy / "link").symlink_to("/etc/hostname")
    fails_naming(copy, "link: extra symbolic link")


def test_listed_file_replaced_by_symlink_fails(copy, tmp_path):
    real = tmp_path / "outside.md"
    shutil.copy(copy / "decision.md", real)
    (copy / "decision.md").unlink()
    (copy / "decision.md").symlink_to(real)
    fails_naming(copy, "decision.md: not a regular file")


def test_renamed_file_reports_missing_and_extra_with_a_hint(copy):
    os.rename(copy / "eval" / "report.md", copy / "eval" / "report-old.md")
    report = verify(copy, raise_on_failure=False)
    assert not report.ok
    assert "eval/report.md: missing (renamed to eval/report-old.md?)" in report.problems
    assert (
        "eval/report-old.md: extra file not in MANIFEST.json (renamed from eval/report.md?)"
        in report.problems
    )
    message = fails_naming(copy, "eval/report.md")
    assert message.endswith("(+1 more)")


def test_several_problems_make_one_line_with_a_count(copy):
    (copy / "run.json").unlink()
    (copy / "decision.md").write_text("DISCARD\n")
    (copy / "x").write_text("")
    report = verify(copy, raise_on_failure=False)
    assert len(report.problems) == 3
    assert report.one_line().endswith("(+2 more)")
    assert report.render().startswith("FAILED (3 problems)")
    assert "decision.md" in report.problems[0]


def test_tampered_archive_fails_naming_the_file(copy, tmp_path):
    (copy / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 0.1}\n')
    archive = tmp_path / "tampered.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(copy, arcname=copy.name)
    fails_naming(archive, "metrics.jsonl: content changed")


def test_archive_with_an_extra_top_level_entry_fails(copy, tmp_path):
    archive = tmp_path / "extra.tar.gz"
    (tmp_path / "stowaway.txt").write_text("hi")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(copy, arcname=copy.name)
        tar.add(tmp_path / "stowaway.txt", arcname="stowaway.txt")
    fails_naming(archive, "stowaway.txt")


def test_missing_bundle_path_is_a_clear_error(tmp_path):
    with pytest.raises(FtError, match="no such bundle"):
        verify(tmp_path / "nope")


# ---------------------------------------------------------------- signing through package/verify


@pytest.fixture
def keys(tmp_path) -> tuple[Path, Path]:
    return signing.generate_keypair(tmp_path / "k" / "ft.key", tmp_path / "k" / "ft.pub")


def test_signed_bundle_round_trip(tmp_path, keys):
    private, public = keys
    out = package(make_run(tmp_path), tmp_path / "out", sign_key=private)
    assert (out / "MANIFEST.json.sig").is_file()
    assert "MANIFEST.json.sig" not in listed(out)
    for target in (out, tmp_path / "out" / "demo-run.tar.gz"):
        report = verify(target, key=public)
        assert report.ok and report.signed and "signature: valid" in report.render()
    unchecked = verify(out)  # no key: allowed, but said
    assert unchecked.ok and not unchecked.signed and unchecked.signature_present
    assert "signature: NOT CHECKED" in unchecked.render()


def test_resealed_manifest_with_old_signature_fails(tmp_path, keys):
    private, public = keys
    out = package(make_run(tmp_path), tmp_path / "out", sign_key=private, archive=False)
    (out / "decision.md").write_text("# KEEP (trust me)\n")
    manifest = json.loads((out / "MANIFEST.json").read_text())
    for e in manifest["files"]:
        if e["path"] == "decision.md":
            blob = (out / "decision.md").read_bytes()
            e["sha256"], e["bytes"] = hashlib.sha256(blob).hexdigest(), len(blob)
    write_manifest(out, manifest, reseal=True)
    assert verify(out).ok  # hashes and identity are consistent again: only the signature can tell
    assert "signature does not match" in fails_naming(out, "MANIFEST.json.sig", key=public)


def test_wrong_key_fails(tmp_path, keys):
    private, _ = keys
    _, other_public = signing.generate_keypair(tmp_path / "o" / "x.key", tmp_path / "o" / "x.pub")
    out = package(make_run(tmp_path), tmp_path / "out", sign_key=private, archive=False)
    fails_naming(out, "MANIFEST.json.sig: signature does not match", key=other_public)


def test_key_given_but_bundle_unsigned_fails(sealed, keys):
    fails_naming(sealed, "MANIFEST.json.sig: missing", key=keys[1])


def test_malformed_signature_fails_even_without_a_key(tmp_path, keys):
    out = package(make_run(tmp_path), tmp_path / "out", sign_key=keys[0], archive=False)
    (out / "MANIFEST.json.sig").write_text("not base64 at all!\n")
    fails_naming(out, "MANIFEST.json.sig")


def test_bad_signing_key_is_refused_before_any_work(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("nope")
    with pytest.raises(FtError, match="bad.pem"):
        package(make_run(tmp_path), tmp_path / "out", sign_key=bad)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- identity (issue 9.2)


def _id_of(bundle_dir: Path) -> str:
    return hashlib.sha256((bundle_dir / "MANIFEST.json").read_bytes()).hexdigest()


def test_identity_is_printed_recorded_beside_and_in_the_readme(tmp_path):
    out = package(make_run(tmp_path), tmp_path / "bundles")
    raw = (out / "MANIFEST.json").read_bytes()
    bundle_id = _id_of(out)
    assert raw == (json.dumps(json.loads(raw), indent=2, sort_keys=True, ensure_ascii=True) + "\n").encode()
    sidecar = tmp_path / "bundles" / "demo-run.manifest.sha256"
    assert sidecar.read_text() == f"{bundle_id}  demo-run/MANIFEST.json\n"
    assert bundle_id in (out / "README.md").read_text().splitlines()[-1]
    assert f"identity {bundle_id}" in bundle.render_package(out)
    for target in (out, tmp_path / "bundles" / "demo-run.tar.gz"):
        report = verify(target)
        assert report.identity == bundle_id and report.sidecar == sidecar
        assert f"identity: {bundle_id}" in report.render()
    if shutil.which("sha256sum"):  # checkable without ft
        import subprocess

        check = subprocess.run(["sha256sum", "-c", sidecar.name], cwd=sidecar.parent, capture_output=True)
        assert check.returncode == 0, check.stdout


@pytest.mark.parametrize("new", ["DISCARD", "KEEPX", "keep"])
@pytest.mark.parametrize("form", ["directory", "archive", "directory without sidecar"])
def test_editing_the_verdict_in_the_manifest_fails(tmp_path, new, form):
    out = package(make_run(tmp_path), tmp_path / "bundles", archive=False)
    if form == "directory without sidecar":
        (tmp_path / "bundles" / "demo-run.manifest.sha256").unlink()
    manifest = out / "MANIFEST.json"
    manifest.write_text(manifest.read_text().replace('"verdict": "KEEP"', f'"verdict": "{new}"'))
    target = out
    if form == "archive":
        target = tmp_path / "bundles" / "demo-run.tar.gz"
        with tarfile.open(target, "w:gz") as tar:
            tar.add(out, arcname="demo-run")
    report = verify(target, raise_on_failure=False)
    assert not report.ok
    assert any("identity" in p for p in report.problems), report.problems
    with pytest.raises(BundleError):
        verify(target)


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: t + " ",
        lambda t: t.rstrip("\n"),
        lambda t: t.replace('"verdict": "KEEP"', '"verdict":  "KEEP"'),
        lambda t: json.dumps(json.loads(t), indent=4, sort_keys=True) + "\n",
        lambda t: json.dumps(dict(reversed(json.loads(t).items())), indent=2) + "\n",
        lambda t: t.replace("\n", "\r\n"),
    ],
    ids=["trailing space", "no final newline", "double space", "indent 4", "unsorted keys", "CRLF"],
)
def test_whitespace_or_order_only_edit_of_the_manifest_fails(copy, edit):
    manifest = copy / "MANIFEST.json"
    manifest.write_bytes(edit(manifest.read_text()).encode())
    assert "not in canonical form" in fails_naming(copy, "MANIFEST.json")


def test_verdict_edit_resealed_everywhere_is_still_caught_by_the_report(copy):
    manifest = json.loads((copy / "MANIFEST.json").read_text())
    manifest["verdict"] = "DISCARD"
    write_manifest(copy, manifest, reseal=True)
    fails_naming(copy, "verdict 'DISCARD' is not eval/report.json's 'KEEP'")


def test_sidecar_records_the_identity_the_sender_sealed(tmp_path):
    out = package(make_run(tmp_path), tmp_path / "bundles", archive=False)
    sealed_sidecar = (tmp_path / "bundles" / "demo-run.manifest.sha256").read_text()
    manifest = json.loads((out / "MANIFEST.json").read_text())
    manifest["data_included"] = True  # any edit, with README and sidecar rewritten to match...
    write_manifest(out, manifest, reseal=True)
    assert verify(out).ok  # ...is a different bundle that verifies on its own: the identity is what differs
    assert verify(out).identity != sealed_sidecar.split()[0]
    (tmp_path / "bundles" / "demo-run.manifest.sha256").write_text(sealed_sidecar)  # what the sender sent
    fails_naming(out, "recorded in demo-run.manifest.sha256")


def test_readme_identity_line_must_name_this_manifest(copy):
    readme = copy / "README.md"
    lines = readme.read_text().splitlines(keepends=True)
    readme.write_text("".join(lines[:-1]) + identity.readme_line("0" * 64))
    fails_naming(copy, "README.md: its last line does not give this bundle's identity")
    readme.write_text("".join(lines[:-1]))
    fails_naming(copy, "README.md")


def test_bundle_sealed_by_an_older_ft_is_refused_with_a_hint(copy):
    manifest = json.loads((copy / "MANIFEST.json").read_text())
    manifest["format"] = "ft-bundle/1"
    write_manifest(copy, manifest)
    assert "re-sealed" in fails_naming(copy, "format 'ft-bundle/1'")


def test_signature_not_checked_is_said_plainly_and_can_be_required(tmp_path, keys, capsys):
    from ft.cli import main

    private, public = keys
    signed = package(make_run(tmp_path / "s"), tmp_path / "s" / "out", sign_key=private, archive=False)
    unsigned = package(make_run(tmp_path / "u"), tmp_path / "u" / "out", archive=False)
    text = verify(signed).render()
    assert "signature: NOT CHECKED" in text and "--key" in text
    fails_naming(
        signed, "not checked; --require-signature needs the signer's public key", require_signature=True
    )
    fails_naming(unsigned, "MANIFEST.json.sig: missing; --require-signature", require_signature=True)
    assert verify(signed, key=public, require_signature=True).signed
    capsys.readouterr()
    assert main(["verify", str(signed), "--require-signature"]) == 2
    assert main(["verify", str(signed), "--key", str(public), "--require-signature"]) == 0
    assert "signature: valid" in capsys.readouterr().out


# ---------------------------------------------------------------- hostile manifests (issue 9.7)

DEEP = {
    "array": b"[" * 200_000 + b"]" * 200_000,
    "object": b'{"a":' * 200_000 + b"1" + b"}" * 200_000,
}


@pytest.mark.parametrize("shape", sorted(DEEP))
@pytest.mark.parametrize("form", ["directory", "archive"])
def test_manifest_nested_200000_deep_is_one_line_exit_2(tmp_path, capsys, shape, form):
    from ft.cli import main

    bundle_dir = tmp_path / "deep"
    bundle_dir.mkdir()
    (bundle_dir / "MANIFEST.json").write_bytes(DEEP[shape])
    target = bundle_dir
    if form == "archive":
        target = tmp_path / "deep.tar.gz"
        with tarfile.open(target, "w:gz") as tar:
            tar.add(bundle_dir, arcname="deep")
    work = tmp_path / "work"
    for argv in (["verify", str(target)], ["reproduce", str(target), "--work", str(work)]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and "nested too deeply" in err[-1], err
    assert not work.exists()
