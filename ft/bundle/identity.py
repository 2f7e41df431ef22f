"""A bundle's identity: the sha256 of its MANIFEST.json, which is kept in one canonical form.

The manifest pins every other file by sha256, so its own digest names the whole bundle: two people
can compare one short string, over the phone if need be. That only works if a manifest has exactly one
byte form, otherwise re-indenting it (or any edit re-serialised by hand) would give the "same" bundle a
new identity, or a changed one an old identity. So the manifest must be byte-equal to `canonical()` of
its own parsed content; `ft verify` refuses anything else.

The identity travels in three places, all checked by `ft verify`:
- printed by `ft package` and `ft verify`, for the sender to pass on and the receiver to compare;
- a sidecar `<name>.manifest.sha256` beside the bundle, in `sha256sum` format (`sha256sum -c` checks it
  without ft). A sidecar rather than the archive's name: names get changed on the way (downloads add
  " (1)", chat tools rewrite them) and every command in the README and docs names the archive by run;
- the last line of the bundle's README.md. README.md is itself listed in the manifest, which cannot
  contain its own digest, so its entry covers the README without that last line (`head -n -1`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ft.bundle import signing
from ft.errors import FtError

FORMAT = "ft-bundle/2"
MANIFEST = "MANIFEST.json"
SIGNATURE = MANIFEST + signing.SIG_SUFFIX
README = "README.md"
SIDECAR_SUFFIX = ".manifest.sha256"
# A manifest lists files at ~150 bytes each; this allows ~100k files and bounds what is read into memory.
MAX_MANIFEST_BYTES = 16 * 2**20
_HEX = set("0123456789abcdef")


def canonical(manifest: dict[str, Any]) -> bytes:
    """The one byte form of a manifest: sorted keys, 2-space indent, ASCII only, one trailing newline."""
    return (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")


def digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def parse(raw: bytes) -> dict[str, Any]:
    """The manifest's content, or FtError when it is not JSON, nested absurdly deep, or not canonical."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise FtError(f"{MANIFEST}: {len(raw)} bytes, more than any bundle needs ({MAX_MANIFEST_BYTES})")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise FtError(f"{MANIFEST}: not valid JSON (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise FtError(f"{MANIFEST}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise FtError(f"{MANIFEST}: not a JSON object")
    try:
        form = canonical(manifest)
    except (TypeError, ValueError, RecursionError):  # NaN and friends are JSON to Python, not to us
        raise FtError(f"{MANIFEST}: holds values JSON cannot carry") from None
    if form != raw:
        raise FtError(
            f"{MANIFEST}: not in canonical form (edited or re-serialised after sealing); "
            "its identity would not name its content"
        )
    return manifest


def readme_line(identity: str) -> str:
    """The README's last line: the only part of README.md the manifest does not (and cannot) cover."""
    return f"Bundle identity: `{identity}` (sha256 of {MANIFEST}; compare it with what the sender told you)\n"


def sidecar_path(bundle: Path) -> Path:
    """`bundles/NAME.manifest.sha256` for `bundles/NAME/` and `bundles/NAME.tar.gz` alike."""
    bundle = Path(bundle)
    name = bundle.name.removesuffix(".tar.gz").removesuffix(".tgz")
    return bundle.with_name(name + SIDECAR_SUFFIX)


def sidecar_text(identity: str, root: str) -> str:
    return f"{identity}  {root}/{MANIFEST}\n"


def read_sidecar(path: Path) -> str:
    """The identity recorded in a sidecar, or FtError when it is not one."""
    try:
        text = path.read_bytes()[:4096].decode("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise FtError(f"{path.name}: cannot read the recorded identity ({exc})") from None
    recorded = text.split(" ", 1)[0].strip().lower()
    if len(recorded) != 64 or not set(recorded) <= _HEX:
        raise FtError(f"{path.name}: does not start with a sha256 hex digest")
    return recorded
