"""`data.columns`: read ft's fields from columns with other names (Hub datasets, LLaMA-Factory or axolotl
files), and name the user's column, not ft's field, when a row is refused."""

from __future__ import annotations

import re
from typing import Any

# The top-level fields ft reads from a row, over every shape (see ft.data.shapes).
FIELDS = (
    "messages",
    "conversations",
    "instruction",
    "input",
    "output",
    "system",
    "history",
    "prompt",
    "completion",
    "text",
    "tools",
)
_HEAD = re.compile(r"[^.\[]+")


def check_mapping(mapping: dict[str, str]) -> dict[str, str]:
    """The mapping, or a ValueError naming the unknown fields (with the valid ones) or a reused column."""
    unknown = [name for name in mapping if name not in FIELDS]
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; the fields are: {', '.join(FIELDS)}")
    seen: dict[str, str] = {}
    for name, column in mapping.items():
        if not column:
            raise ValueError(f"{name}: empty column name")
        if column in seen:
            raise ValueError(f"column {column!r} is given for both {seen[column]} and {name}")
        seen[column] = name
    return mapping


def rename(row: Any, mapping: dict[str, str]) -> Any:
    """The row with each mapped column under ft's field name. A column already named like a mapped
    field is left out: the mapping says where that field comes from."""
    if not mapping or not isinstance(row, dict):
        return row
    taken = set(mapping) | set(mapping.values())
    out = {key: value for key, value in row.items() if key not in taken}
    for name, column in mapping.items():
        if column in row:
            out[name] = row[column]
    return out


def user_field(field: str | None, mapping: dict[str, str]) -> str | None:
    """A problem's field path (`messages[1].role`) with its first part as the user's column name."""
    if not field or not mapping:
        return field
    head = _HEAD.match(field)
    if head is None or head.group() not in mapping:
        return field
    return mapping[head.group()] + field[head.end() :]
