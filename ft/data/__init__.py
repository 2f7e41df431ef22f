"""The data check: read, normalise, validate, apply the recipe's policies, split, and report.

    result = check(settings)            # raises DataError (an FtError) listing what is wrong
    result.train, result.eval           # lists of Example (normalised chat messages + where they came from)
    result.report                       # the run's data.json; render_report(result.report) for people

Order of work, and why: every row is parsed and validated first (one pass, problems collected), so a
user sees all that is wrong at once and nothing is tokenised for data that will be refused. Then
duplicates go (cheap), the survivors are rendered through the chat template once and tokenised in
large batches by the fast tokenizer, the held-out split is drawn, and the length policy is applied.
The split is drawn before lengths matter, so changing train.max_seq_length never reshuffles it, and
rows that share a prompt always land on the same side, so a seeded split cannot leak.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ft.data.files import MAX_LINE_BYTES, DataError, FileInfo, Problems, read_rows
from ft.data.report import Tallies, Tally, build_report, render_report
from ft.data.shapes import RowProblem, extract_label, normalise, show
from ft.errors import FtError, located

__all__ = ["CheckResult", "DataError", "Example", "check", "render_report"]

BATCH = 4096  # rows rendered and tokenised per call while measuring lengths


@dataclass(slots=True)
class Example:
    """One normalised conversation and where it came from."""

    messages: list[dict[str, str]]
    source: str  # the file name as the user gave it
    line: int | str  # 1-based line (JSONL) or "[index]" (JSON array)
    shape: str
    label: str | None = None
    tokens: int = 0  # length under the model's tokenizer and chat template (set by check)

    @property
    def id(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass
class CheckResult:
    train: list[Example]
    eval: list[Example]
    report: dict[str, Any]


def check(settings: Any, *, tokenizer: Any = None, max_line_bytes: int = MAX_LINE_BYTES) -> CheckResult:
    """Check the recipe's data files and return the normalised, split examples with their report.

    `tokenizer` defaults to the recipe model's; `max_line_bytes` caps one JSONL line.
    """
    d = settings.data
    if not d.train:
        raise DataError(["data.train: no training files given"])
    problems = Problems()
    context = _RowContext(d, problems)
    train = context.load(d.train, "train", max_line_bytes)
    held = context.load(d.eval, "eval", max_line_bytes)
    problems.raise_if_any()

    if tokenizer is None:
        from ft.modelref import load_tokenizer

        m = settings.model
        tokenizer = load_tokenizer(m.name_or_path, m.revision, m.trust_remote_code)
    tallies = Tallies()
    train = _apply_duplicates(train, d.duplicates, tallies.duplicates, problems)
    held = _apply_duplicates(held, d.duplicates, tallies.duplicates, problems)
    _measure(train + held, tokenizer, problems)
    problems.raise_if_any()
    lengths = [ex.tokens for ex in train + held]

    if d.eval:
        _find_leakage(train, held, tallies.leakage, problems)
    else:
        train, held = _seeded_split(train, d, problems)
    problems.raise_if_any()

    train, held = _fit_lengths(train, held, settings, tokenizer, tallies, problems)
    problems.raise_if_any()
    counts = {
        "read": context.rows,
        "shapes": context.shapes,
        "system_prompt_added": context.system_prompt_added,
    }
    report = build_report(settings, tokenizer, context.files, counts, tallies, lengths, train, held)
    return CheckResult(train, held, report)


# -- reading and validating ----------------------------------------------------------------------------
class _RowContext:
    """What turning rows into Examples needs, and what it counts on the way."""

    def __init__(self, data_settings: Any, problems: Problems):
        self.d = data_settings
        self.problems = problems
        self.declared = set(data_settings.labels) if data_settings.labels is not None else None
        self.files: list[FileInfo] = []
        self.shapes: Counter[str] = Counter()
        self.rows = 0
        self.system_prompt_added = 0

    def load(self, paths: list[str], role: str, max_line_bytes: int) -> list[Example]:
        """Examples from every file in `paths` (names kept as the user wrote them)."""
        from ft.config import resolve_path

        examples: list[Example] = []
        for given in paths:
            info = FileInfo(role, given)
            self.files.append(info)
            try:
                path = Path(resolve_path(given))
            except FtError as exc:
                self.problems.add(str(exc))
                continue
            for line, row in read_rows(path, info, self.problems, max_line_bytes=max_line_bytes):
                example = self.example(row, given, line)
                if example is not None:
                    examples.append(example)
        return examples

    def example(self, row: Any, source: str, line: int | str) -> Example | None:
        self.rows += 1
        try:
            shape, messages, answer_field = normalise(row, self.d.format)
            label = self._label(messages[-1]["content"], answer_field)
        except RowProblem as p:
            self.problems.add(located(source, line, p.field, p.problem))
            return None
        except RecursionError:
            self.problems.add(located(source, line, None, "nested too deeply"))
            return None
        if self.d.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.d.system_prompt})
            self.system_prompt_added += 1
        self.shapes[shape] += 1
        return Example(messages, source, line, shape, label)

    def _label(self, answer: str, answer_field: str) -> str | None:
        field_name = self.d.label_field
        if not field_name:
            return None
        label = extract_label(answer, field_name, answer_field)
        if self.declared is not None and label not in self.declared:
            allowed = ", ".join(self.d.labels)
            raise RowProblem(
                answer_field, f"{field_name} {show(label)} is not one of {allowed} (data.labels)"
            )
        return label


# -- policies ------------------------------------------------------------------------------------------
def _digest(text: str) -> bytes:
    # A 128-bit digest instead of the text itself keeps the lookup tables small on big data sets.
    return _blake2b()(text.encode("utf-8"), digest_size=16).digest()


@functools.cache
def _blake2b() -> Any:
    import hashlib  # loading OpenSSL is a third of this module's import time; pay it only when checking

    return hashlib.blake2b


def conversation_key(messages: list[dict[str, str]]) -> bytes:
    """Identity of a normalised conversation (exact text: a duplicate is the very same conversation)."""
    return _digest("\x1f".join(f"{m['role']}\x1e{m['content']}" for m in messages))


def prompt_key(messages: list[dict[str, str]]) -> bytes:
    """Identity of a row's prompt for leakage: every non-assistant turn, whitespace collapsed, casefolded.

    A row with no user or tool turn (a text row) has no prompt; its whole text stands in for it.
    """
    asked = [m for m in messages if m["role"] != "assistant"]
    if not any(m["role"] != "system" for m in asked):
        asked = messages
    return _digest("\x1f".join(f"{m['role']}\x1e{' '.join(m['content'].split()).casefold()}" for m in asked))


def _apply_duplicates(rows: list[Example], policy: str, tally: Tally, problems: Problems) -> list[Example]:
    seen: dict[bytes, str] = {}
    kept: list[Example] = []
    for ex in rows:
        key = conversation_key(ex.messages)
        first = seen.get(key)
        if first is None:
            seen[key] = ex.id
            kept.append(ex)
            continue
        tally.add(f"{ex.id} = {first}")
        if policy == "error":
            problems.add(
                f"{ex.id}: duplicate of {first} (data.duplicates is error; drop or keep would accept it)"
            )
        elif policy == "keep":
            kept.append(ex)
    return kept


def _measure(rows: list[Example], tokenizer: Any, problems: Problems) -> None:
    """Set `tokens` on every row: one template render per row, tokenised in large batches."""
    from ft.data.encode import render_each, template_problem, token_lengths

    for lo in range(0, len(rows), BATCH):
        batch = rows[lo : lo + BATCH]

        def refused(index: int, exc: Exception, batch: list[Example] = batch) -> None:
            problems.add(f"{batch[index].id}: {template_problem(exc)}")

        texts = render_each(tokenizer, [ex.messages for ex in batch], refused)
        rendered = [(ex, text) for ex, text in zip(batch, texts, strict=True) if text is not None]
        for (ex, _), n in zip(rendered, token_lengths(tokenizer, [t for _, t in rendered]), strict=True):
            ex.tokens = n


def _fit_lengths(
    train: list[Example],
    held: list[Example],
    settings: Any,
    tokenizer: Any,
    tallies: Tallies,
    problems: Problems,
) -> tuple[list[Example], list[Example]]:
    """Apply data.too_long to both sides; refuse when a side is left with nothing."""
    d, max_len = settings.data, settings.train.max_seq_length
    fitted = _apply_too_long(train, max_len, d.too_long, tokenizer, tallies, problems)
    fitted_held = _apply_too_long(held, max_len, d.too_long, tokenizer, tallies, problems)
    if problems.total:
        return fitted, fitted_held
    if not fitted:
        everything = train if fitted_held else train + held
        problems.add(_nothing_fits(", ".join(d.train), everything, max_len, d.too_long))
    elif held and not fitted_held:
        problems.add(_nothing_fits(", ".join(d.eval) or "the held-out split", held, max_len, d.too_long))
    return fitted, fitted_held


def _apply_too_long(
    rows: list[Example], max_len: int, policy: str, tokenizer: Any, tallies: Tallies, problems: Problems
) -> list[Example]:
    long_rows = [ex for ex in rows if ex.tokens > max_len]
    for ex in long_rows:
        tallies.over.add(f"{ex.id} ({ex.tokens} tokens)")
        if policy == "error":
            problems.add(
                f"{ex.id}: {ex.tokens} tokens, longer than train.max_seq_length ({max_len}) and data.too_long "
                "is error (drop or truncate would accept it)"
            )
    if not long_rows or policy == "error":
        return rows
    if policy == "drop":
        gone = {id(ex) for ex in long_rows}
        for ex in long_rows:
            tallies.too_long.add(ex.id)
    else:  # truncate keeps the start; a row whose prompt alone fills the window has no answer left
        gone = {id(ex) for ex in _prompt_fills_window(long_rows, max_len, tokenizer)}
        for ex in long_rows:
            if id(ex) in gone:
                tallies.prompt_fills_window.add(ex.id)
    return [ex for ex in rows if id(ex) not in gone]


def _nothing_fits(where: str, rows: list[Example], max_len: int, policy: str) -> str:
    """The problem when the length policy left one side with no rows at all."""
    shortest = min(ex.tokens for ex in rows)
    return (
        f"{where}: all {len(rows)} rows are longer than train.max_seq_length ({max_len} tokens; the shortest has "
        f"{shortest}) and data.too_long is {policy}; raise train.max_seq_length or shorten the rows"
    )


def _prompt_fills_window(rows: list[Example], max_len: int, tokenizer: Any) -> list[Example]:
    from ft.data.encode import generation_header, render_chats, token_lengths

    prompts = []
    for ex in rows:
        first_answer = next(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
        prompts.append(ex.messages[:first_answer])
    header = generation_header(tokenizer) if any(not p for p in prompts) else ""
    asked = render_chats(tokenizer, [p for p in prompts if p], add_generation_prompt=True)
    texts = iter(asked)
    lengths = token_lengths(tokenizer, [next(texts) if p else header for p in prompts])
    return [ex for ex, n in zip(rows, lengths, strict=True) if n >= max_len]


# -- split and leakage ---------------------------------------------------------------------------------
def _find_leakage(train: list[Example], held: list[Example], tally: Tally, problems: Problems) -> None:
    trained: dict[bytes, str] = {}
    for ex in train:
        trained.setdefault(prompt_key(ex.messages), ex.id)
    for ex in held:
        other = trained.get(prompt_key(ex.messages))
        if other is not None:
            tally.add(f"{ex.id} = {other}")
            problems.add(
                f"{ex.id}: the same prompt is in the training data at {other} (train/eval leakage); "
                "remove it from one side"
            )


def _seeded_split(rows: list[Example], d: Any, problems: Problems) -> tuple[list[Example], list[Example]]:
    """Hold out about eval_fraction of rows (at most eval_max_rows), whole prompt groups at a time."""
    if len(rows) < 2:
        problems.add(
            f"data: {len(rows)} row(s) left, too few to hold out an eval split; add rows or give data.eval"
        )
        return rows, []
    target = min(d.eval_max_rows, max(1, round(len(rows) * d.eval_fraction)))
    groups: dict[bytes, list[int]] = {}
    for index, ex in enumerate(rows):
        groups.setdefault(prompt_key(ex.messages), []).append(index)
    order = list(groups.values())
    random.Random(d.split_seed).shuffle(order)
    chosen: set[int] = set()
    for group in order:
        if len(chosen) + len(group) <= target:
            chosen.update(group)
            if len(chosen) == target:
                break
    if not chosen or len(chosen) == len(rows):
        problems.add(
            f"data: cannot hold out {target} row(s) without splitting rows that share a prompt "
            f"({len(groups)} distinct prompt(s) in {len(rows)} rows); give data.eval files"
        )
    train = [ex for i, ex in enumerate(rows) if i not in chosen]
    held = [ex for i, ex in enumerate(rows) if i in chosen]
    return train, held
