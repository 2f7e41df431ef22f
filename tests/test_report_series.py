"""The series report.html draws that the trainer and the data check must record: GPU memory per
logged step (CUDA only; faked here at torch's real call signatures) and a token-length histogram."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from ft import train as training
from ft.data.report import token_stats


def _log_one_step(tmp_path, monkeypatch, cuda: bool):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5 * 2**30)
    cb = training._callbacks(tmp_path, None)[-1]
    state = SimpleNamespace(global_step=1, epoch=0.1, num_input_tokens_seen=100, is_world_process_zero=True)
    cb.on_log(None, state, None, logs={"loss": 1.0, "learning_rate": 1e-3, "grad_norm": 0.5})
    return json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])


def test_train_rows_carry_gpu_memory_on_cuda(tmp_path, monkeypatch):
    row = _log_one_step(tmp_path, monkeypatch, cuda=True)
    assert row["gpu_memory_bytes"] == 3 * 2**30 and row["gpu_peak_bytes"] == 5 * 2**30


def test_train_rows_have_no_gpu_memory_on_cpu(tmp_path, monkeypatch):
    row = _log_one_step(tmp_path, monkeypatch, cuda=False)
    assert "gpu_memory_bytes" not in row and "gpu_peak_bytes" not in row


def test_token_stats_keep_a_histogram():
    lengths = [10] * 5 + [50] * 3 + [100]
    hist = token_stats(lengths)["histogram"]
    assert len(hist["edges"]) == len(hist["counts"]) + 1
    assert sum(hist["counts"]) == len(lengths)
    assert hist["edges"][0] <= 10 and hist["edges"][-1] >= 100
    assert token_stats([])["histogram"] == {"edges": [], "counts": []}
    assert token_stats([7, 7])["histogram"]["counts"] == [2]
