"""Optional Ed25519 signatures over a bundle's MANIFEST.json.

The manifest already pins every file by sha256, so one detached signature over its exact bytes vouches
for the whole bundle: whoever holds the public key can tell the bundle came from the holder of the
private key and was not re-sealed after tampering. Keys are plain PEM files kept by the user; ft never
stores, uploads or prints a private key. The signature file holds base64 text so it survives email and
chat, and Ed25519 is deterministic, so re-signing the same manifest gives the same bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from pathlib import Path

from ft.errors import FtError
from ft.fsutil import write_bytes

SIG_SUFFIX = ".sig"
SIG_BYTES = 64


def _crypto():
    """Imported on use: keeps `ft --help` fast and signing truly optional."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # pragma: no cover - cryptography is a declared dependency
        raise FtError("signing needs the 'cryptography' package", hint="pip install cryptography") from exc
    return serialization, ed25519, InvalidSignature


def generate_keypair(private_path: Path, public_path: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair as PEM; the private key is created with mode 0600."""
    private_path, public_path = Path(private_path), Path(public_path)
    if not overwrite:
        for path in (private_path, public_path):
            if path.exists():
                raise FtError(f"{path}: already exists; refusing to overwrite a key (remove it first)")
    serialization, ed25519, _ = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_bytes(private_path, private_pem, mode=0o600)  # never readable by others, not even for a moment
    write_bytes(public_path, public_pem, mode=0o644)
    return private_path, public_path


def _read_key(path: Path, kind: str):
    serialization, ed25519, _ = _crypto()
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FtError(f"{path}: cannot read {kind} key ({exc.strerror or exc})") from None
    if kind == "private":
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise FtError(f"{path}: not an unencrypted PEM private key ({exc})") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise FtError(f"{path}: not an Ed25519 private key", hint="make one with `ft keygen`")
        return key
    if b"PRIVATE KEY" in data:
        raise FtError(f"{path}: this is a private key; verify with the public key (the .pub file)")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise FtError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise FtError(f"{path}: not an Ed25519 public key", hint="make one with `ft keygen`")
    return key


def check_private_key(path: Path) -> None:
    """Fail early (before copying gigabytes) when `path` is not a usable Ed25519 private key."""
    _read_key(path, "private")


def fingerprint(public_key_path: Path) -> str:
    """Short sha256 of the raw public key, for people to compare out of band."""
    serialization, _, _ = _crypto()
    raw = _read_key(public_key_path, "public").public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:16]


def sign_file(path: Path, private_key_path: Path) -> Path:
    """Write `<path>.sig`: base64 Ed25519 signature over the exact bytes of `path`."""
    path = Path(path)
    signature = _read_key(private_key_path, "private").sign(path.read_bytes())
    return write_bytes(path.with_name(path.name + SIG_SUFFIX), base64.b64encode(signature) + b"\n")


def decode_signature(sig_path: Path) -> bytes:
    """The raw signature bytes, or FtError when the file is not a well-formed signature."""
    try:
        raw = base64.b64decode(Path(sig_path).read_bytes().strip(), validate=True)
    except (binascii.Error, ValueError):
        raise FtError(f"{Path(sig_path).name}: not a base64 signature") from None
    if len(raw) != SIG_BYTES:
        raise FtError(f"{Path(sig_path).name}: signature is {len(raw)} bytes, expected {SIG_BYTES}")
    return raw


def verify_file(path: Path, sig_path: Path, public_key_path: Path) -> None:
    """Raise FtError unless `sig_path` is a valid signature over `path` by the key's holder."""
    _, _, invalid = _crypto()
    key = _read_key(public_key_path, "public")
    signature = decode_signature(sig_path)
    try:
        key.verify(signature, Path(path).read_bytes())
    except invalid:
        raise FtError(
            f"{Path(sig_path).name}: signature does not match {Path(path).name} under key "
            f"{Path(public_key_path).name} (tampered bundle or wrong key)"
        ) from None
