"""Reading data files: JSON Lines streamed line by line, JSON arrays, and every way they go wrong.

Rows come out as `(line, object)`: `line` is the 1-based line number in a JSONL file, or the string
`[index]` for an element of a JSON array. Problems are collected (not raised one by one) so a user
sees how much is wrong in one go; the file is hashed while it is read, so it is read once.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ft.errors import FtError, located

MAX_LINE_BYTES = 64 << 20  # a JSONL line longer than this is refused without being read whole
MAX_PROBLEMS = 50  # problems kept in the error (all are counted, and all reach a sink)
BOM = b"\xef\xbb\xbf"
_SPACE = b" \t\r\n"
JSONL_SUFFIXES = (".jsonl", ".ndjson")


class DataError(FtError):
    """Problems with the data; `problems` lists them (up to MAX_PROBLEMS), the message is the first."""

    def __init__(self, problems: list[str], total: int | None = None):
        total = len(problems) if total is None else total
        more = f" (+{total - 1} more)" if total > 1 else ""
        super().__init__(problems[0] + more)
        self.problems = problems
        self.total = total


class Problems:
    """A capped list of one-line problem messages, in the order they were found.

    `sink`, when given, receives every problem as it is found, past the cap: that is how `-v` lists them
    all without holding millions of messages in memory.
    """

    def __init__(self, cap: int = MAX_PROBLEMS, sink: Callable[[str], None] | None = None):
        self.cap = cap
        self.sink = sink
        self.items: list[str] = []
        self.total = 0

    def add(self, message: str) -> None:
        self.total += 1
        message = " ".join(message.splitlines())  # one line, whatever the data held
        if self.sink is not None:
            self.sink(message)
        if len(self.items) < self.cap:
            self.items.append(message)

    def raise_if_any(self) -> None:
        if self.total:
            raise DataError(self.items, self.total)


@dataclass
class FileInfo:
    """What the data manifest records about one input file."""

    role: str  # "train" or "eval"
    name: str  # as the user wrote it
    sha256: str = ""
    bytes: int = 0
    rows: int = 0
    format: str = ""
    _hash: Any = field(default=None, repr=False)

    def feed(self, chunk: bytes) -> None:
        if self._hash is None:
            import hashlib  # deferred: loading OpenSSL would dominate `import ft.data`

            self._hash = hashlib.sha256()
        self._hash.update(chunk)
        self.bytes += len(chunk)

    def seal(self) -> None:
        self.feed(b"")
        self.sha256 = self._hash.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "name": self.name,
            "format": self.format,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "rows": self.rows,
        }


def read_rows(
    path: Path, info: FileInfo, problems: Problems, *, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[tuple[int | str, Any]]:
    """Yield `(line, parsed JSON)` for every row of a JSONL or JSON-array file; problems go to `problems`."""
    name = info.name
    try:
        handle = _open_regular(path, name)
    except FtError as exc:
        problems.add(str(exc))
        return
    with handle:
        first = _first_byte(handle)
        handle.seek(0)
        if first is None:
            problems.add(f"{name}: no rows (the file is empty)")
            return
        info.format = _choose_format(path, name, first, problems)
        if not info.format:
            return
        if info.format == "jsonl":
            blank = yield from _read_jsonl(handle, info, problems, max_line_bytes)
        else:
            blank = False
            yield from _read_json_array(handle, info, problems)
    info.seal()
    if blank:
        problems.add(f"{name}: no rows (only blank lines)")


def _open_regular(path: Path, name: str):
    """Open for binary reading, refusing what is not a plain file (a FIFO would block forever)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FtError(f"{name}: no such file") from None
    except OSError as exc:
        raise FtError(f"{name}: cannot read: {(exc.strerror or str(exc)).lower()}") from None
    if stat.S_ISDIR(mode):
        raise FtError(f"{name}: is a directory, not a data file; list the files inside it instead")
    if not stat.S_ISREG(mode):
        raise FtError(f"{name}: not a regular file (a pipe, socket or device); give a .jsonl or .json file")
    try:
        return open(path, "rb")  # noqa: SIM115 - closed by the caller's `with`
    except OSError as exc:
        raise FtError(f"{name}: cannot read: {(exc.strerror or str(exc)).lower()}") from None


def _first_byte(handle) -> bytes | None:
    """The first byte that is not whitespace or a UTF-8 BOM, or None for an empty file."""
    start = handle.read(len(BOM))
    chunk = start[len(BOM) :] if start == BOM else start
    while True:
        stripped = chunk.lstrip(_SPACE)
        if stripped:
            return stripped[:1]
        chunk = handle.read(1 << 16)
        if not chunk:
            return None


def _choose_format(path: Path, name: str, first: bytes, problems: Problems) -> str:
    """`jsonl` or `json` from the extension, or from the first byte when the extension says nothing."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES and first == b"[":
        problems.add(
            f"{name}:1: starts with '[', so it holds a JSON array, not JSON Lines (one object per line); "
            "name it .json or write one object per line"
        )
        return ""
    if suffix == ".json" and first != b"[":
        problems.add(
            f"{name}: starts with {first.decode('latin-1')!r}, not '[': a .json file must hold one array of rows; "
            "JSON Lines (one object per line) belong in a .jsonl file"
        )
        return ""
    if suffix == ".json" or (suffix not in JSONL_SUFFIXES and first == b"["):
        return "json"
    return "jsonl"


def _read_jsonl(
    handle, info: FileInfo, problems: Problems, max_line_bytes: int
) -> Generator[tuple[int, Any], None, bool]:
    """Yield the rows; return True when every line was blank (a line with a problem is not blank)."""
    name = info.name
    lineno = 0
    blank = True
    while True:
        raw = handle.readline(max_line_bytes + 1)
        if not raw:
            return blank
        lineno += 1
        if len(raw) > max_line_bytes:
            problems.add(
                f"{name}:{lineno}: line is longer than {_size(max_line_bytes)}; one JSON Lines row should be "
                "far smaller (is this really JSON Lines?); the rest of the file was not read"
            )
            return False
        info.feed(raw)
        if lineno == 1 and raw.startswith(BOM):
            raw = raw[len(BOM) :]
        if raw.isspace() or not raw:
            continue
        blank = False
        row = _parse_line(raw, name, lineno, problems)
        if row is not _INVALID:
            info.rows += 1
            yield lineno, row


_INVALID = object()


def _parse_line(raw: bytes, name: str, lineno: int, problems: Problems) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1].hex()
        problems.add(
            f"{name}:{lineno}: not valid UTF-8 (byte 0x{bad} at byte {exc.start + 1}); save the file as UTF-8"
        )
        return _INVALID
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        # The parser reports running out of input after the line's newline, as column 1 of a next line.
        content = len(text.rstrip())
        where = (
            f"column {content + 1}: the line ends before the row does"
            if exc.pos >= content
            else f"column {exc.colno}"
        )
        problems.add(f"{name}:{lineno}: invalid JSON: {exc.msg} ({where})")
        return _INVALID
    except RecursionError:
        problems.add(f"{name}:{lineno}: invalid JSON: nested too deeply")
        return _INVALID
    except ValueError:  # a JSONDecodeError is one too, so this catches only the int-string limit
        problems.add(f"{name}:{lineno}: invalid JSON: {_HUGE_NUMBER}")
        return _INVALID
    if _may_hold_surrogate(text) and (where := _lone_surrogate(row)):
        problems.add(
            located(name, lineno, where, "contains an unpaired UTF-16 surrogate escape (not valid text)")
        )
        return _INVALID
    return row


def _read_json_array(handle, info: FileInfo, problems: Problems) -> Iterator[tuple[str, Any]]:
    """A JSON array is parsed whole (the format has no line boundaries); its bytes are freed before yielding."""
    name = info.name
    data = handle.read()
    info.feed(data)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        problems.add(
            f"{name}:{line}: not valid UTF-8 (byte 0x{data[exc.start : exc.start + 1].hex()}); save the file as UTF-8"
        )
        return
    del data
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = "; JSON Lines (one object per line) belong in a .jsonl file" if exc.msg == "Extra data" else ""
        content = len(text.rstrip())
        if exc.pos >= content:  # ran out of input: point at the end of the last line that has any
            line = text.count("\n", 0, content) + 1
            column = content - text.rfind("\n", 0, content)
            where = f"{line}: invalid JSON: {exc.msg} (column {column}: the file ends before the array does)"
        else:
            where = f"{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno}){hint}"
        problems.add(f"{name}:{where}")
        return
    except RecursionError:
        problems.add(f"{name}: invalid JSON: nested too deeply")
        return
    except ValueError:  # the int-string limit; json gives no position, so find the digits
        found = re.search(rf"\d{{{_max_digits() + 1},}}", text)
        line = f":{text.count(chr(10), 0, found.start()) + 1}" if found else ""
        problems.add(f"{name}{line}: invalid JSON: {_HUGE_NUMBER}")
        return
    escapes = _may_hold_surrogate(text)
    del text
    if not isinstance(rows, list):
        problems.add(f"{name}: the top level is a JSON {type(rows).__name__}, not an array of rows")
        return
    if not rows:
        problems.add(f"{name}: no rows (the array is empty)")
        return
    info.rows = len(rows)
    for index in range(len(rows)):
        row, rows[index] = rows[index], None  # hand each row over so it is held once
        where = _lone_surrogate(row) if escapes else None
        if where:
            problems.add(located(name, f"[{index}]", where, "contains an unpaired UTF-16 surrogate escape"))
            continue
        yield f"[{index}]", row


def _max_digits() -> int:
    return sys.get_int_max_str_digits() or 4300


_HUGE_NUMBER = (
    f"a number with more than {_max_digits()} digits (Python refuses to convert it); "
    "store such a value as a string"
)


def _may_hold_surrogate(text: str) -> bool:
    """Only a \\uD800-\\uDFFF escape can put a lone surrogate into parsed JSON; skip the walk otherwise."""
    return "\\ud" in text or "\\uD" in text


def _lone_surrogate(value: Any) -> str | None:
    try:
        return _find_surrogate(value, "")
    except RecursionError:  # json.loads accepted the depth, but this walk adds frames of its own
        return "value (nested too deeply to inspect)"


def _find_surrogate(value: Any, path: str) -> str | None:
    """The field path of the first string holding a lone surrogate (it cannot be encoded, so no tokenizer takes it)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "value"
        return None
    if isinstance(value, dict):
        children = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, list):
        children = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for child_path, child in children:
        found = _find_surrogate(child, child_path)
        if found:
            return found
    return None


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n} bytes"
