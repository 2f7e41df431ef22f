"""Charts for the HTML report: matplotlib drawn to SVG text, inlined into the page.

SVG (not PNG) keeps charts sharp on any screen and in print, keeps text as text, and needs no script or
network; matplotlib is already a dependency. Output is deterministic (fixed hash salt, no date) so two
reports of the same run are byte-identical.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

Series = tuple[str, Sequence[float], Sequence[float]]  # (label, x values, y values)
_METADATA = re.compile(r"\s*<metadata>.*?</metadata>", re.S)
_SIZE = re.compile(r'\s(?:width|height)="[^"]*"')
MAX_POINTS = 1500  # per series; more is invisible at chart width and only grows the page
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "svg.hashsalt": "ft-report",  # stable ids: the same run gives the same bytes
            "svg.fonttype": "none",  # text stays text: smaller, searchable, selectable
            "text.parse_math": False,  # a label like "$5 refund" is data, not TeX
            "font.size": 9,
            "axes.titlesize": 10,
        }
    )
    return plt


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    _pyplot().close(fig)
    text = buf.getvalue()
    # Inline <svg> in HTML: no XML prolog, doctype or metadata; the page's CSS sizes it (viewBox stays).
    text = _METADATA.sub("", text[text.index("<svg") :], count=1)
    head, rest = text.split(">", 1)
    return _SIZE.sub("", head) + ' role="img">' + rest


def _thin(xs: list[float], ys: list[float], most: int = MAX_POINTS) -> tuple[list[float], list[float]]:
    """Every k-th point (and the last) of a long series: a 100,000-step run stays a page, not megabytes."""
    if len(xs) <= most:
        return xs, ys
    k = -(-len(xs) // most)
    keep = list(range(0, len(xs), k)) + ([len(xs) - 1] if (len(xs) - 1) % k else [])
    return [xs[i] for i in keep], [ys[i] for i in keep]


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    styles: Sequence[str] | None = None,
    log_y: bool = False,
) -> str | None:
    """One SVG with a line per series; None when no series has a point (the caller says so instead)."""
    drawn = [(label, *_thin(list(xs), list(ys))) for label, xs, ys in series if len(xs)]
    if not drawn:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    for i, (label, xs, ys) in enumerate(drawn):
        style = (styles[i] if styles and i < len(styles) else None) or ("o-" if len(xs) < 12 else "-")
        ax.plot(xs, ys, style, label=label, color=PALETTE[i % len(PALETTE)], linewidth=1.4, markersize=3.5)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(drawn) > 1 or drawn[0][0]:
        ax.legend(frameon=False)
    fig.tight_layout()
    return _svg(fig)


def bar_chart(
    labels: Sequence[str], groups: Sequence[tuple[str, Sequence[float]]], *, title: str, ylabel: str
) -> str | None:
    """Grouped bars: one group per label, one bar per (name, values) entry; None when there are no labels."""
    if not labels or not groups:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    width = 0.8 / len(groups)
    for i, (name, values) in enumerate(groups):
        xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, values, width=width, label=name, color=PALETTE[i % len(PALETTE)])
    ax.set_xticks(
        range(len(labels)),
        labels,
        rotation=30 if len(labels) > 6 else 0,
        ha="right" if len(labels) > 6 else "center",
    )
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    if len(groups) > 1:
        ax.legend(frameon=False)
    fig.tight_layout()
    return _svg(fig)


def histogram(
    edges: Sequence[float], counts: Sequence[int], *, title: str, xlabel: str, limit: float | None = None
) -> str | None:
    """Bars between consecutive `edges`; an optional vertical line at `limit` (e.g. max_seq_length)."""
    if not counts or len(edges) != len(counts) + 1:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 2.8))
    widths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color=PALETTE[0], edgecolor="white", linewidth=0.5)
    if limit is not None:
        ax.axvline(limit, color=PALETTE[1], linestyle="--", linewidth=1.2, label=f"limit {limit:g}")
        ax.legend(frameon=False)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _svg(fig)
