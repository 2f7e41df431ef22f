"""Progress on long steps: a live bar in a terminal, rare plain lines in a log, nothing for quick work."""

from __future__ import annotations

import io
import time

import pytest

from ft import progress


class _Stderr(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def _drive(monkeypatch, tty: bool, seconds: float, **patch) -> str:
    err = _Stderr(tty)
    monkeypatch.setattr("sys.stderr", err)
    for name, value in patch.items():
        monkeypatch.setattr(progress, name, value)
    with progress.bar(10, "encode", "row", file=err) as b:
        for _ in range(10):
            time.sleep(seconds / 10)
            b.update(1)
    return err.getvalue()


def test_quick_work_draws_nothing(monkeypatch):
    assert _drive(monkeypatch, tty=False, seconds=0.05) == ""
    assert _drive(monkeypatch, tty=True, seconds=0.05) == ""


def test_long_work_in_a_log_gets_plain_lines_with_rate_and_eta(monkeypatch):
    out = _drive(monkeypatch, tty=False, seconds=0.3, LOG_DELAY_S=0.0, LOG_REFRESH_S=0.05)
    assert "encode" in out and "row" in out
    assert "<" in out  # tqdm's "elapsed<remaining": the ETA


def test_bytes_are_counted_in_binary_units():
    err = _Stderr(False)
    with progress.bar(3 << 20, "read big.jsonl", "B", file=err, delay=0, mininterval=0) as b:
        b.update(3 << 20)
    assert "MiB" in err.getvalue() or "M" in err.getvalue()


@pytest.fixture
def recorded_bars(monkeypatch):
    bars: list[dict] = []

    class Recorder:
        def __init__(self, total, desc, unit, **kw):
            self.record = {"total": total, "desc": desc, "unit": unit, "n": 0}
            bars.append(self.record)
            self.n = 0

        def update(self, k):
            self.n += k
            self.record["n"] = self.n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    import ft.data
    import ft.data.encode

    monkeypatch.setattr(ft.data, "bar", Recorder)
    monkeypatch.setattr(ft.data.encode, "bar", Recorder)
    return bars


def test_data_check_and_encode_report_progress_to_the_end(recorded_bars, tmp_path):
    """The data check reads each file with a byte bar and measures lengths with a row bar; encoding too."""
    from ft.config import load_settings
    from ft.data import check
    from ft.data.encode import encode
    from ft.testing import ensure_tiny_model, ticket_rows, write_jsonl

    ensure_tiny_model()
    data = tmp_path / "train.jsonl"
    write_jsonl(data, ticket_rows(40, seed=3))
    settings = load_settings("tiny", [f"data.train=[{str(data)!r}]"])
    result = check(settings)
    read = [b for b in recorded_bars if b["unit"] == "B"]
    assert read and read[0]["total"] == data.stat().st_size and read[0]["n"] == data.stat().st_size
    lengths = [b for b in recorded_bars if b["desc"] == "token lengths"]
    assert lengths and lengths[0]["n"] == lengths[0]["total"] >= 30  # duplicates are dropped first
    encode(result.train, result.tokenizer, settings.train.max_seq_length)
    enc = [b for b in recorded_bars if b["desc"] == "encode"]
    assert enc and enc[0]["n"] == enc[0]["total"] == len(result.train)
