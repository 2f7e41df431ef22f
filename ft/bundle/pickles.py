"""Bundles hold no pickles: loading a pickle runs code, so weights and state travel as safetensors or JSON.

Checked by name (the usual pickle suffixes), by content (the pickle protocol header, or a torch.save zip
holding one), at sealing and again at verification.
"""

from __future__ import annotations

import contextlib
import json
import struct
import zipfile
from pathlib import Path

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def _is_safetensors(path: Path, size: int) -> bool:
    """A safetensors file: u64 little-endian header length, then that many bytes of a JSON object."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return False
        (n,) = struct.unpack("<Q", head)
        if n < 2 or 8 + n > size or n > 100 * 2**20:
            return False
        try:
            return isinstance(json.loads(f.read(n)), dict)
        except (ValueError, RecursionError):
            return False


def pickle_problem(path: Path) -> str | None:
    """Why `path` looks like a pickle (by name, protocol header or torch.save zip), or None."""
    if path.name.lower().endswith(PICKLE_SUFFIXES):
        return f"'{path.suffix}' files are pickles; save weights as safetensors and state as JSON"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    # Pickle protocols 2-5 start with the PROTO opcode 0x80 and the protocol number.
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and not _is_safetensors(path, size):
        return f"starts with a pickle protocol {head[1]} header"
    if head == b"PK\x03\x04":
        with contextlib.suppress(zipfile.BadZipFile, OSError):
            with zipfile.ZipFile(path) as z:
                inner = [n for n in z.namelist() if n.lower().endswith((".pkl", ".pickle"))]
            if inner:
                return f"a zip holding a pickle ({inner[0]}; torch.save format)"
    return None
