"""Errors a person can act on.

Every problem caused by the user's input (recipe, data, paths, flags) is raised as `FtError`. The CLI
prints its message as one line and exits with code 2; anything else is a bug and exits with 1.
"""

from __future__ import annotations


class FtError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


def located(path: object, line: int | None, field: str | None, problem: str) -> str:
    """Format `file:line: field: problem`, the shape of every data error.

    `line` is a 1-based line number for JSONL files and a 0-based `[index]` for JSON arrays is passed
    as a string by the caller, so it is rendered as given.
    """
    where = str(path)
    if line is not None:
        where = f"{where}:{line}"
    return f"{where}: {field}: {problem}" if field else f"{where}: {problem}"
