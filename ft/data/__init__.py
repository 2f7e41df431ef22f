"""The data check: read, normalise, validate, apply the recipe's policies, split, and report.

    result = check(settings)            # raises DataError (an FtError) listing what is wrong
    result.train, result.eval           # lists of Example (normalised chat messages + where they came from)
    result.report                       # the run's data.json; render_report(result.report) for people

Order of work, and why: every row is parsed and validated first (one pass, problems collected; a row
over data.max_row_chars is refused here), so a user sees all that is wrong at once, and nothing is
downloaded or tokenised for data that will be refused. Duplicates and train/eval leakage need no
tokenizer either, so they come next. Only then is the model's tokenizer loaded; the survivors are
rendered through the chat template once and tokenised in large batches, each row only as far as
train.max_seq_length needs to decide whether it fits (so one giant row costs memory in proportion to
the context, not to the row). The length policy is applied, and the held-out split is drawn from the
rows that survived it, so every held-out row is one the model can be evaluated on. The split's order
is fixed by the seed over all rows, so a changed train.max_seq_length changes it only by the rows it
drops; rows that share a prompt always land on the same side, so a seeded split cannot leak.
"""

from __future__ import annotations

import functools
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ft.data import hub
from ft.data.columns import rename, user_field
from ft.data.files import MAX_LINE_BYTES, DataError, FileInfo, Problems, read_rows
from ft.data.report import Tallies, Tally, ToolCounts, build_report, render_report
from ft.data.shapes import RowProblem, extract_label, normalise_row, show
from ft.data.tools import identity_text, tools_text
from ft.errors import FtError, located
from ft.progress import bar

__all__ = ["CheckResult", "DataError", "Example", "bounded_token_lengths", "check", "render_report"]

BATCH = 4096  # rows rendered and tokenised per call while measuring lengths
# Length statistics tokenise a row's first (max_seq_length + 1) * PREFIX_CHARS_PER_TOKEN characters;
# a row longer than that is tokenised again on a prefix twice as long, only while the prefix still fits.
PREFIX_CHARS_PER_TOKEN = 8
SLACK_TOKENS = 8  # cutting a text mid-word can add a token or two at the cut; never decide on those
DROPPED_WARNING = 0.5  # warn when the policies drop more than this fraction of the rows read
_SPACES = re.compile(r"\s+")


@dataclass(slots=True)
class Example:
    """One normalised conversation and where it came from."""

    messages: list[dict[str, Any]]  # {"role", "content"}, plus tool_calls / reasoning_content / tool ids
    source: str  # the file name as the user gave it
    line: int | str  # 1-based line (JSONL) or "[index]" (JSON array)
    shape: str
    label: str | None = None
    tokens: int = 0  # length under the model's tokenizer and chat template (set by check)
    tokens_exact: bool = True  # False: the row is longer than max_seq_length and `tokens` is a lower bound
    tools: list[dict[str, Any]] | None = None  # the row's function definitions (transformers convention)

    @property
    def id(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass
class CheckResult:
    train: list[Example]
    eval: list[Example]
    report: dict[str, Any]
    tokenizer: Any = None  # the tokenizer the lengths were measured with


def check(
    settings: Any,
    *,
    tokenizer: Any = None,
    max_line_bytes: int = MAX_LINE_BYTES,
    on_problem: Callable[[str], None] | None = None,
) -> CheckResult:
    """Check the recipe's data files and return the normalised, split examples with their report.

    `tokenizer` defaults to the recipe model's, loaded only once the rows have passed every check that
    needs none; `max_line_bytes` caps one JSONL line; `on_problem` receives every problem as it is found
    (the raised DataError keeps the first few).
    """
    d = settings.data
    if not d.train:
        raise DataError(["data.train: no training files given"])
    problems = Problems(sink=on_problem)
    context = _RowContext(d, problems)
    train = context.load(d.train, "train", max_line_bytes)
    held = context.load(d.eval, "eval", max_line_bytes)
    problems.raise_if_any()

    tallies = Tallies()
    train = _apply_duplicates(train, d.duplicates, tallies.duplicates, problems)
    held = _apply_duplicates(held, d.duplicates, tallies.duplicates, problems)
    if d.eval:
        _find_leakage(train, held, tallies.leakage, problems)
    problems.raise_if_any()

    if tokenizer is None:
        from ft.modelref import recipe_tokenizer

        tokenizer = recipe_tokenizer(settings)  # with data.chat_template applied
    measured = train + held
    from ft.data.encode import tool_support_problem

    unsupported = tool_support_problem(tokenizer, measured)
    if unsupported:
        problems.add(unsupported)
        problems.raise_if_any()
    _measure(measured, tokenizer, settings.train.max_seq_length, problems)
    problems.raise_if_any()
    lengths = [ex.tokens for ex in measured]

    train, held = _fit_lengths(train, held, settings, tokenizer, tallies, problems)
    problems.raise_if_any()
    if not d.eval:  # held is empty until the split: every measured row is a training row so far
        train, held = _seeded_split(measured, train, d, problems)
        problems.raise_if_any()

    counts = {
        "read": context.rows,
        "shapes": context.shapes,
        "system_prompt_added": context.system_prompt_added,
        "tools": context.tool_rows.to_dict(),
    }
    report = build_report(settings, tokenizer, context.files, counts, tallies, lengths, train, held)
    # Over-long rows are counted only until they exceed max_seq_length: their counts are lower bounds.
    report["tokens"]["partly_counted"] = sum(not ex.tokens_exact for ex in measured)
    report["warnings"] = _warnings(context.rows, report["dropped"])
    return CheckResult(train, held, report, tokenizer)


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:  # read_rows reports the problem itself
        return None


def _warnings(read: int, dropped: dict[str, Any]) -> list[str]:
    """Say so when the policies threw most of the data away: the run would train on what little is left."""
    counts = {reason: tally["count"] for reason, tally in dropped.items() if tally["count"]}
    gone = sum(counts.values())
    if not read or gone <= read * DROPPED_WARNING:
        return []
    why = ", ".join(f"{reason.replace('_', ' ')}: {n}" for reason, n in counts.items())
    hints = []
    if set(counts) - {"duplicate"}:
        hints.append("train.max_seq_length and data.too_long")
    if "duplicate" in counts:
        hints.append("the repeated rows (data.duplicates)")
    return [
        f"{gone} of {read} rows ({round(100 * gone / read)}%) were dropped ({why}); check {' and '.join(hints)}"
    ]


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
        self.tool_rows = ToolCounts()

    def load(self, paths: list[str], role: str, max_line_bytes: int) -> list[Example]:
        """Examples from every file in `paths` (names kept as the user wrote them)."""
        from ft.config import resolve_path

        examples: list[Example] = []
        for given in paths:
            if not _is_utf8(given):
                # The name could not be written into data.json or a bundle; refuse it before anything else.
                self.problems.add(
                    f"data.{role}: {ascii(given)[1:-1]}: the file name is not valid UTF-8; rename the file"
                )
                continue
            if hub.is_hub(given):
                examples += self._load_hub(hub.HubInfo(role, given))
                continue
            info = FileInfo(role, given)
            self.files.append(info)
            try:
                path = Path(resolve_path(given))
            except FtError as exc:
                self.problems.add(str(exc))
                continue
            if not _is_utf8(str(path)):
                self.problems.add(
                    f"{given}: the path {ascii(str(path))[1:-1]} is not valid UTF-8; "
                    "rename the folder or give another path"
                )
                continue
            with bar(_file_size(path), f"read {given}", "B") as progress:
                for line, row in read_rows(path, info, self.problems, max_line_bytes=max_line_bytes):
                    example = self.example(row, given, line)
                    if example is not None:
                        examples.append(example)
                    progress.update(info.bytes - progress.n)
        return examples

    def _load_hub(self, info: hub.HubInfo) -> list[Example]:
        """Examples from one split of a Hub dataset, located as `hf:org/name[split]:#index`."""
        self.files.append(info)
        examples = []
        for line, row in hub.read_rows(info, self.problems):
            example = self.example(row, info.label, line)
            if example is not None:
                examples.append(example)
        return examples

    def example(self, row: Any, source: str, line: int | str) -> Example | None:
        self.rows += 1
        columns = self.d.columns
        try:
            normal = normalise_row(rename(row, columns), self.d.format)
            shape, messages, answer_field = normal.shape, normal.messages, normal.answer_field
            label = self._label(messages[-1]["content"], answer_field)
        except RowProblem as p:
            self.problems.add(located(source, line, user_field(p.field, columns), p.problem))
            return None
        except RecursionError:
            self.problems.add(located(source, line, None, "nested too deeply"))
            return None
        if self.d.reasoning == "drop":
            for m in messages:
                m.pop("reasoning_content", None)
        chars = sum(len(identity_text(m)) for m in messages)
        if chars > self.d.max_row_chars:
            self.problems.add(
                located(
                    source,
                    line,
                    None,
                    f"{chars:,} characters, more than data.max_row_chars ({self.d.max_row_chars:,}); "
                    "shorten or split the row, or raise data.max_row_chars",
                )
            )
            return None
        if self.d.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.d.system_prompt})
            self.system_prompt_added += 1
        self.shapes[shape] += 1
        self.tool_rows.count(normal.tools, messages)
        return Example(messages, source, line, shape, label, tools=normal.tools)

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


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a name Python decoded with surrogateescape, or a lone \\udcxx escape
        return False
    return True


# -- policies ------------------------------------------------------------------------------------------
def _digest(text: str) -> bytes:
    # A 128-bit digest instead of the text itself keeps the lookup tables small on big data sets.
    return _blake2b()(text.encode("utf-8"), digest_size=16).digest()


@functools.cache
def _blake2b() -> Any:
    import hashlib  # loading OpenSSL is a third of this module's import time; pay it only when checking

    return hashlib.blake2b


def conversation_key(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> bytes:
    """Identity of a normalised conversation (exact text: a duplicate is the very same conversation)."""
    return _digest("\x1f".join(f"{m['role']}\x1e{identity_text(m)}" for m in messages) + tools_text(tools))


def prompt_key(messages: list[dict[str, str]]) -> bytes:
    """Identity of a row's prompt for leakage: every non-assistant turn, whitespace collapsed, casefolded.

    A row with no user or tool turn (a text row) has no prompt; its whole text stands in for it. The text
    is hashed piece by piece, so a giant row costs no more than one piece of memory on top of itself.
    """
    asked = [m for m in messages if m["role"] != "assistant"]
    if not any(m["role"] != "system" for m in asked):
        asked = messages
    digest = _blake2b()(digest_size=16)
    for n, m in enumerate(asked):
        digest.update(f"{chr(0x1F) if n else ''}{m['role']}\x1e".encode())
        for piece in _collapsed(m["content"]):
            digest.update(piece.casefold().encode("utf-8"))
    return digest.digest()


def _collapsed(text: str, chunk: int = 1 << 20) -> Iterator[str]:
    """The pieces of `' '.join(text.split())`, made a chunk at a time: the word list of a 200 MB row
    (or re.sub's list of pieces) would take gigabytes."""
    started = pending_space = False
    for lo in range(0, len(text), chunk):
        part = _SPACES.sub(" ", text[lo : lo + chunk])  # every whitespace run is now one space
        core = part.strip(" ")
        if part.startswith(" "):
            pending_space = True
        if core:
            if pending_space and started:
                yield " "
            yield core
            started, pending_space = True, False
        if part.endswith(" "):
            pending_space = True


def _apply_duplicates(rows: list[Example], policy: str, tally: Tally, problems: Problems) -> list[Example]:
    seen: dict[bytes, str] = {}
    kept: list[Example] = []
    for ex in rows:
        key = conversation_key(ex.messages, ex.tools)
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


def _measure(rows: list[Example], tokenizer: Any, max_len: int, problems: Problems) -> None:
    """Set `tokens` on every row: one template render per row, tokenised in large batches, each row
    only as far as deciding whether it fits in `max_len` needs."""
    with bar(len(rows), "token lengths", "row") as progress:
        for lo in range(0, len(rows), BATCH):
            _measure_batch(rows[lo : lo + BATCH], tokenizer, max_len, problems)
            progress.update(min(BATCH, len(rows) - lo))


def _measure_batch(batch: list[Example], tokenizer: Any, max_len: int, problems: Problems) -> None:
    from ft.data.encode import render_each, template_problem

    def refused(index: int, exc: Exception) -> None:
        problems.add(f"{batch[index].id}: {template_problem(exc)}")

    texts = render_each(tokenizer, [ex.messages for ex in batch], refused, tools=[ex.tools for ex in batch])
    rendered = [(ex, text) for ex, text in zip(batch, texts, strict=True) if text is not None]
    del texts
    measured = bounded_token_lengths(tokenizer, [t for _, t in rendered], max_len)
    for (ex, _), (n, exact) in zip(rendered, measured, strict=True):
        ex.tokens, ex.tokens_exact = n, exact


def bounded_token_lengths(tokenizer: Any, texts: list[str], max_len: int) -> list[tuple[int, bool]]:
    """`(tokens, exact)` for each rendered text, tokenising no more of it than deciding `<= max_len` needs.

    A text is tokenised on a prefix of (max_len + 1) * PREFIX_CHARS_PER_TOKEN characters; if it is
    longer and its prefix already holds more than max_len (+ slack) tokens, it is over-long and the
    prefix's count is a lower bound (`exact` False). If the prefix still fits (very long tokens), the
    prefix doubles until it does not, or until it is the whole text, whose count is then exact.
    """
    from ft.data.encode import token_lengths

    out: list[tuple[int, bool] | None] = [None] * len(texts)
    pending = list(range(len(texts)))
    limit = (max_len + 1) * PREFIX_CHARS_PER_TOKEN
    while pending:
        counts = token_lengths(tokenizer, [texts[i][:limit] for i in pending])
        undecided = []
        for i, n in zip(pending, counts, strict=True):
            if len(texts[i]) <= limit:
                out[i] = (n, True)
            elif n > max_len + SLACK_TOKENS:
                out[i] = (n - SLACK_TOKENS, False)
            else:
                undecided.append(i)
        pending, limit = undecided, limit * 2
    return out  # type: ignore[return-value]


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
        size = f"{ex.tokens} tokens" if ex.tokens_exact else f"over {max_len} tokens"
        tallies.over.add(f"{ex.id} ({size})")
        if policy == "error":
            problems.add(
                f"{ex.id}: {size}, longer than train.max_seq_length ({max_len}) and data.too_long "
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
    from ft.data.encode import generation_header, render_chats

    prompts, tools = [], []
    for ex in rows:
        first_answer = next(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
        prompts.append(ex.messages[:first_answer])
        tools.append(ex.tools)
    header = generation_header(tokenizer) if any(not p for p in prompts) else ""
    asked = render_chats(
        tokenizer,
        [p for p in prompts if p],
        add_generation_prompt=True,
        tools=[t for p, t in zip(prompts, tools, strict=True) if p],
    )
    texts = iter(asked)
    lengths = bounded_token_lengths(tokenizer, [next(texts) if p else header for p in prompts], max_len)
    return [ex for ex, (n, _) in zip(rows, lengths, strict=True) if n >= max_len]


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


def _seeded_split(
    measured: list[Example], rows: list[Example], d: Any, problems: Problems
) -> tuple[list[Example], list[Example]]:
    """Hold out about eval_fraction of `rows` (at most eval_max_rows), whole prompt groups at a time.

    `rows` are the survivors of the length policy among `measured`. The seed orders the prompt groups
    of all `measured` rows, and the split walks that order over the survivors: a row that survives two
    settings of train.max_seq_length is visited at the same point under both.
    """
    if len(rows) < 2:
        problems.add(
            f"data: {len(rows)} row(s) left, too few to hold out an eval split; add rows or give data.eval"
        )
        return rows, []
    target = min(d.eval_max_rows, max(1, round(len(rows) * d.eval_fraction)))
    kept = {id(ex) for ex in rows}
    groups: dict[bytes, list[int]] = {}
    for index, ex in enumerate(measured):
        groups.setdefault(prompt_key(ex.messages), []).append(index)
    order = list(groups.values())
    random.Random(d.split_seed).shuffle(order)
    chosen: set[int] = set()
    for group in order:
        members = [i for i in group if id(measured[i]) in kept]
        if members and len(chosen) + len(members) <= target:
            chosen.update(members)
            if len(chosen) == target:
                break
    if not chosen or len(chosen) == len(rows):
        distinct = len({prompt_key(ex.messages) for ex in rows})
        problems.add(
            f"data: cannot hold out {target} row(s) without splitting rows that share a prompt "
            f"({distinct} distinct prompt(s) in {len(rows)} rows); give data.eval files"
        )
    train = [ex for i, ex in enumerate(measured) if id(ex) in kept and i not in chosen]
    held = [ex for i, ex in enumerate(measured) if i in chosen]
    return train, held
