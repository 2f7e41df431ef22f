"""A Hub model with no network: data errors first, then one attempt and one line (issue 9, item 5).

huggingface_hub retries a file it has not cached five times with backoff, printing a line per try (~50 s
for `ft data check` on the default recipe). ft asks the Hub once, before transformers does: when that
fails it uses the model's cached snapshot, or stops with one line naming the model, the cache and
HF_HUB_OFFLINE=1. The unreachable Hub is a closed local port given as HF_ENDPOINT.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROWS = [
    {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
    for i in range(12)
]
NO_LABELS = ["--set", "data.label_field=null", "--set", "data.labels=null"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on leaving: connecting is refused at once


def online_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HOME=str(tmp_path / "hf-home"))
    return env


def ft(tmp_path: Path, *argv: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "ft", *argv],
        cwd=tmp_path,
        env=online_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done, time.perf_counter() - started


def test_bad_data_is_reported_before_any_download(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b"")
    done, _ = ft(tmp_path, "data", "check", "--train", "bad.jsonl")
    assert (done.returncode, done.stderr) == (2, "error: bad.jsonl: no rows (the file is empty)\n")


def test_an_unreachable_hub_fails_after_one_attempt_with_one_line(tmp_path):
    (tmp_path / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    done, seconds = ft(tmp_path, "data", "check", "--train", "good.jsonl", *NO_LABELS)
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    line = lines[0]
    assert line.startswith(
        "error: model.name_or_path: cannot reach the Hugging Face Hub at http://127.0.0.1:"
    )
    assert "'Qwen/Qwen2.5-0.5B-Instruct'" in line and "HF_HUB_OFFLINE=1" in line
    assert str(tmp_path / "hf-home" / "hub") in line  # where the cache would be
    # Five retries sleep 23 s per file; one refused connection takes milliseconds (the rest is start-up).
    assert seconds < 23, f"took {seconds:.1f} s"


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """This process, online, against a closed port, with an empty cache; records any retry sleeps."""
    import huggingface_hub.utils._http as http
    from huggingface_hub import constants

    import ft.modelref

    endpoint = f"http://127.0.0.1:{closed_port()}"
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    sleeps: list[float] = []
    monkeypatch.setattr(http.time, "sleep", sleeps.append)
    ft.modelref._hub_source.cache_clear()
    yield tmp_path / "hub", sleeps
    ft.modelref._hub_source.cache_clear()


def test_no_retries_and_no_cache_is_one_error(unreachable_hub):
    from ft.errors import FtError
    from ft.modelref import load_tokenizer

    _, sleeps = unreachable_hub
    with pytest.raises(FtError, match=r"cannot reach the Hugging Face Hub .*'acme/tiny'.*HF_HUB_OFFLINE=1"):
        load_tokenizer("acme/tiny")
    assert sleeps == []


def test_a_cached_model_is_used_when_the_hub_cannot_be_reached(unreachable_hub, tiny_model_dir, tmp_path):
    from ft.modelref import load_tokenizer, resolve_model_path

    hub, sleeps = unreachable_hub
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / "models--acme--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    assert resolve_model_path("acme/tiny") == str(repo / "snapshots" / commit)
    assert load_tokenizer("acme/tiny").chat_template
    assert sleeps == []
