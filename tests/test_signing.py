"""Ed25519 keys and detached signatures over a manifest's exact bytes."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from ft.bundle import signing
from ft.errors import FtError


@pytest.fixture
def keys(tmp_path) -> tuple[Path, Path]:
    return signing.generate_keypair(tmp_path / "ft.key", tmp_path / "ft.pub")


@pytest.fixture
def manifest(tmp_path) -> Path:
    path = tmp_path / "MANIFEST.json"
    path.write_text('{"format": "ft-bundle/1", "files": []}\n')
    return path


def test_keypair_is_pem_and_private_key_is_owner_only(keys):
    private, public = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert signing.fingerprint(public).startswith("sha256:")


def test_keygen_refuses_to_overwrite(keys):
    private, public = keys
    before = private.read_bytes()
    with pytest.raises(FtError, match="already exists"):
        signing.generate_keypair(private, public)
    assert private.read_bytes() == before


def test_round_trip(keys, manifest):
    sig = signing.sign_file(manifest, keys[0])
    assert sig.name == "MANIFEST.json.sig"
    signing.verify_file(manifest, sig, keys[1])


def test_signature_is_deterministic(keys, manifest):
    first = signing.sign_file(manifest, keys[0]).read_bytes()
    assert signing.sign_file(manifest, keys[0]).read_bytes() == first


def test_one_changed_byte_in_the_manifest_fails(keys, manifest):
    sig = signing.sign_file(manifest, keys[0])
    manifest.write_text(manifest.read_text().replace("[]", "[ ]"))
    with pytest.raises(FtError, match=r"^MANIFEST.json.sig: signature does not match MANIFEST.json"):
        signing.verify_file(manifest, sig, keys[1])


def test_wrong_key_fails(keys, manifest, tmp_path):
    sig = signing.sign_file(manifest, keys[0])
    _, other = signing.generate_keypair(tmp_path / "o.key", tmp_path / "o.pub")
    with pytest.raises(FtError, match="signature does not match"):
        signing.verify_file(manifest, sig, other)


def test_tampered_signature_fails(keys, manifest):
    sig = signing.sign_file(manifest, keys[0])
    text = sig.read_text().strip()
    sig.write_text(("A" if text[0] != "A" else "B") + text[1:] + "\n")
    with pytest.raises(FtError, match="signature does not match"):
        signing.verify_file(manifest, sig, keys[1])


@pytest.mark.parametrize("content", ["not base64!", "c2hvcnQ="])
def test_malformed_signature_is_named(keys, manifest, content):
    sig = manifest.with_name("MANIFEST.json.sig")
    sig.write_text(content)
    with pytest.raises(FtError, match="MANIFEST.json.sig"):
        signing.verify_file(manifest, sig, keys[1])


def test_private_key_given_for_verification_is_refused(keys, manifest):
    sig = signing.sign_file(manifest, keys[0])
    with pytest.raises(FtError, match="private key"):
        signing.verify_file(manifest, sig, keys[0])


def test_non_key_files_are_clear_errors(tmp_path, manifest):
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(FtError, match="junk.pem"):
        signing.sign_file(manifest, junk)
    with pytest.raises(FtError, match="junk.pem"):
        signing.fingerprint(junk)
    with pytest.raises(FtError, match="cannot read"):
        signing.check_private_key(tmp_path / "absent.key")
