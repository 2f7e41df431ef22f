"""Rows from a Hugging Face Hub dataset, read through the user's cache by the `datasets` library.

A `data.train` / `data.eval` entry names one split of one dataset:

    hf:ORG/NAME                      split `train` of the default config, latest revision
    hf:ORG/NAME:SPLIT                another split
    hf:ORG/NAME:CONFIG:SPLIT         a named config
    hf:ORG/NAME@REVISION...          pinned to a commit hash (or a branch/tag) of the dataset repository

`datasets.load_dataset` does the reading, so the user's cache (HF_HOME, HF_DATASETS_CACHE) and offline
switches (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE) work as they do everywhere else. The manifest entry
records the commit the cache holds and the dataset's fingerprint; its sha256 is that of the rows written
as JSON Lines (one canonical line per row), so the run's data digest follows the rows themselves.
Rows are converted from Arrow a batch at a time and handed over one by one: the table stays in the
memory-mapped cache file, and each row exists as Python objects once.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ft.data.files import FileInfo, Problems
from ft.errors import FtError

PREFIX = "hf:"
DEFAULT_SPLIT = "train"
BATCH_ROWS = 1000  # rows converted from Arrow per step: bounded memory, few calls
_REPO = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_PART = re.compile(r"[\w.-]+")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHORT_COMMIT = re.compile(r"[0-9a-f]{7,40}")


@dataclass(frozen=True)
class HubSpec:
    given: str  # as the user wrote it
    repo: str
    revision: str | None
    config: str | None
    split: str

    @property
    def label(self) -> str:
        """How rows are located in messages and split ids: `hf:org/name[train]`."""
        rev = f"@{self.revision}" if self.revision else ""
        config = f":{self.config}" if self.config else ""
        return f"{PREFIX}{self.repo}{rev}{config}[{self.split}]"


def is_hub(name: str) -> bool:
    return name.startswith(PREFIX)


def parse(given: str) -> HubSpec:
    """The parts of `hf:ORG/NAME[@REVISION][[:CONFIG]:SPLIT]`, or an FtError saying what is wrong."""
    head, *rest = given.removeprefix(PREFIX).split(":")
    repo, _, revision = head.partition("@")
    usage = "write hf:ORG/NAME, hf:ORG/NAME:SPLIT or hf:ORG/NAME:CONFIG:SPLIT, each with optional @REVISION"
    if len(rest) > 2 or not _REPO.fullmatch(repo) or (_ and not revision) or any(not p for p in rest):
        raise FtError(f"{given}: not a Hub dataset name ({usage})")
    if any(not _PART.fullmatch(p) for p in rest):
        raise FtError(f"{given}: config and split names are letters, digits, '_', '-' and '.' ({usage})")
    config, split = (rest[0], rest[1]) if len(rest) == 2 else (None, rest[0] if rest else DEFAULT_SPLIT)
    return HubSpec(given, repo, revision or None, config, split)


@dataclass
class HubInfo(FileInfo):
    """A Hub split in the data manifest: a file entry plus where the rows came from."""

    dataset: str = ""
    config: str | None = None
    split: str = ""
    revision: str | None = None  # the commit the rows were read at, when the cache records it
    fingerprint: str | None = None  # `datasets`' fingerprint of the loaded split
    label: str = ""  # rows are located as `{label}:#index`

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "source": "huggingface-hub",
            "dataset": self.dataset,
            "config": self.config,
            "split": self.split,
            "revision": self.revision,
            "fingerprint": self.fingerprint,
        }


def read_rows(info: HubInfo, problems: Problems) -> Iterator[tuple[str, Any]]:
    """Yield `("#index", row)` (0-based) for every row of the split `info.name` names; problems go to
    `problems`.

    The row is what `datasets` gives, minus null fields: Arrow gives every row every column (and every
    message every struct field) and fills the ones a row lacks with null, where a JSON file would just
    leave them out.
    """
    from ft.progress import bar

    try:
        spec = parse(info.name)
        dataset = load(spec)
    except FtError as exc:
        problems.add(str(exc))
        return
    info.format = "hf"
    info.dataset, info.config, info.split, info.label = spec.repo, spec.config, spec.split, spec.label
    info.revision = cached_revision(dataset)
    info.fingerprint = getattr(dataset, "_fingerprint", None)
    if not len(dataset):
        problems.add(f"{spec.label}: no rows (the split is empty)")
        return
    with bar(len(dataset), f"read {info.name}", "row") as progress:
        for index, row in enumerate(_rows(dataset, progress.update)):
            info.feed(_canonical_line(row))
            info.rows += 1
            yield f"#{index}", row
    info.seal()


def _rows(dataset: Any, on_batch: Any = None) -> Iterator[dict[str, Any]]:
    """The split's rows as JSON-like dicts, one Arrow batch's values held at a time."""
    for batch in dataset.iter(batch_size=BATCH_ROWS):
        names = list(batch)
        columns = [batch.pop(name) for name in names]
        count = len(columns[0]) if columns else 0
        for values in zip(*columns, strict=True):
            yield _without_nulls(dict(zip(names, values, strict=True)))
        del columns
        if on_batch is not None:
            on_batch(count)


def pinned_name(entry: dict[str, Any]) -> str:
    """The `hf:` name of a data-manifest entry at the exact commit it was read at (when known)."""
    spec = parse(str(entry["name"]))
    revision = entry.get("revision") or spec.revision
    rev = f"@{revision}" if revision else ""
    config = f"{entry.get('config') or spec.config}:" if (entry.get("config") or spec.config) else ""
    return f"{PREFIX}{entry.get('dataset') or spec.repo}{rev}:{config}{entry.get('split') or spec.split}"


def write_canonical(entry: dict[str, Any], dest: Path) -> str:
    """Write a recorded Hub split's rows to `dest` as the canonical JSON Lines its sha256 covers (so a
    bundle can carry them, and the file reads back as the same rows); returns that sha256."""
    import hashlib

    dataset = load(parse(pinned_name(entry)))
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        for row in _rows(dataset):
            line = _canonical_line(row)
            digest.update(line)
            out.write(line)
    return digest.hexdigest()


def load(spec: HubSpec) -> Any:
    """The split as a `datasets.Dataset` (memory-mapped from the cache), or an FtError in one line."""
    import datasets

    offline = bool(datasets.config.HF_HUB_OFFLINE)
    try:
        with _quiet(datasets):
            dataset = datasets.load_dataset(spec.repo, spec.config, split=spec.split, revision=spec.revision)
    except Exception as exc:  # `datasets` raises many types; every one is a problem with this entry
        raise FtError(_load_problem(spec, exc, offline)) from None
    if not isinstance(dataset, datasets.Dataset):  # split= gives one; anything else is not a table to read
        raise FtError(f"{spec.given}: did not load as one split of a dataset")
    if spec.revision:
        _check_revision(spec, cached_revision(dataset), offline)
    return dataset


@contextlib.contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """`datasets`' own progress bars and "using the cached version" warnings off while it loads: ft draws
    its own bar, and a cached read is what was asked for."""
    level, bars_on = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if bars_on:
            datasets.enable_progress_bars()


def _load_problem(spec: HubSpec, exc: Exception, offline: bool) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    name = type(exc).__name__
    if offline and (isinstance(exc, ConnectionError) or "offline" in text.lower()):
        return (
            f"{spec.given}: not in the Hugging Face datasets cache, and offline mode is on "
            "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); load it once online, or check HF_HOME / HF_DATASETS_CACHE"
        )
    if name == "DatasetNotFoundError":
        return f"{spec.given}: {text} (a private or gated dataset needs a login: HF_TOKEN)"
    if "Unknown split" in text or "Bad split" in text:
        return f"{spec.given}: no split {spec.split!r} ({text})"
    return f"{spec.given}: cannot load the dataset: {text}"


def cached_revision(dataset: Any) -> str | None:
    """The commit hash the rows were read at: `datasets` keeps a Hub split's Arrow files in a folder
    named after the commit it resolved (`<cache>/org___name/<config>/<version>/<commit>/`)."""
    for entry in getattr(dataset, "cache_files", None) or []:
        folder = Path(entry.get("filename", "")).parent.name
        if _COMMIT.fullmatch(folder):
            return folder
    return None


def _check_revision(spec: HubSpec, found: str | None, offline: bool) -> None:
    """Offline, `datasets` reads the newest cached copy whatever the revision asked; refuse other data."""
    if (
        found is not None
        and _SHORT_COMMIT.fullmatch(str(spec.revision))
        and found.startswith(str(spec.revision))
    ):
        return
    wanted = spec.revision if spec.revision and _COMMIT.fullmatch(spec.revision) else _ref(spec)
    if wanted is None:
        if offline:
            raise FtError(
                f"{spec.given}: offline, the cache cannot tell which commit {spec.revision!r} is; "
                "pin the commit hash instead"
            )
        return
    if found is not None and found != wanted:
        raise FtError(
            f"{spec.given}: the cache holds commit {found[:12]}, not revision {spec.revision}; "
            "load that revision once online"
        )


def _ref(spec: HubSpec) -> str | None:
    """A branch or tag's commit, as the Hub cache recorded it when the dataset was downloaded."""
    from huggingface_hub import constants

    repo = "datasets--" + spec.repo.replace("/", "--")
    try:
        text = (Path(constants.HF_HUB_CACHE) / repo / "refs" / str(spec.revision)).read_text().strip()
    except OSError:
        return None
    return text if _COMMIT.fullmatch(text) else None


def _without_nulls(value: Any) -> Any:
    # Strings are most values: they are passed over without a call (this runs on every row).
    if type(value) is dict:
        return {k: v if type(v) is str else _without_nulls(v) for k, v in value.items() if v is not None}
    if type(value) is list:
        return [v if type(v) is str else _without_nulls(v) for v in value]
    return value


def _canonical_line(row: dict[str, Any]) -> bytes:
    text = json.dumps(row, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=_jsonable)
    return text.encode("utf-8", "surrogatepass") + b"\n"


def _jsonable(value: Any) -> Any:
    """Arrow types JSON lacks, written so the digest still follows them."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return repr(value)
