"""Format checks on Markdown answers: does an answer keep the layout of its reference?

For documentation in a house style the reference answers *are* the style: a title, then a fixed set of
section headings in a fixed order. `headings_match` scores how much of that outline an answer
reproduces, so it needs no list of required headings in the recipe and also works for templates whose
sections vary from document to document (each answer is held to its own reference's outline). It is a
format check, not a content check: pair it with eval loss (or token F1) for the words.

Only ATX headings count (`## Steps`); setext underlines and `#` lines inside fenced code blocks do not.
"""

from __future__ import annotations

import re

_ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_WS = re.compile(r"\s+")


def headings(text: str) -> list[tuple[int, str]]:
    """(level, text) of every ATX heading outside fenced code blocks, text whitespace-normalised."""
    out: list[tuple[int, str]] = []
    fence: str | None = None
    for line in text.splitlines():
        opened = _FENCE.match(line)
        if fence is not None:
            if opened and opened.group(1)[0] == fence[0] and len(opened.group(1)) >= len(fence):
                fence = None
            continue
        if opened:
            fence = opened.group(1)
            continue
        m = _ATX.match(line)
        if m:
            out.append((len(m.group(1)), _WS.sub(" ", m.group(2)).strip()))
    return out


def headings_match(pred: str, ref: str) -> float | None:
    """Share of the reference's headings the answer reproduces; None when the reference has none.

    - A title (the reference's first heading, at level 1) counts once: the answer's first heading must
      also be a level-1 heading, with any words (the title's wording is content, its presence format).
    - Every other heading of the reference counts once: the same level and text (case-sensitive) among
      the answer's headings, in the reference's order: the longest common subsequence of the two
      outlines, so a missing, renamed, re-levelled or moved section costs only itself. Extra headings
      in the answer cost nothing.
    """
    want = headings(ref)
    if not want:
        return None
    total, got, hits = len(want), headings(pred), 0
    if want[0][0] == 1:
        hits += bool(got) and got[0][0] == 1
        want, got = want[1:], got[1:] if got and got[0][0] == 1 else got
    return (hits + _common_in_order(want, got)) / total


def _common_in_order(a: list, b: list) -> int:
    """Length of the longest common subsequence (outlines are a few dozen headings at most)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]
