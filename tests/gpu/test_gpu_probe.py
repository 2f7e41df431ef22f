"""On a CUDA GPU: `ft size --probe` measures the peak allocated memory of real steps at the micro-batch and
length the prediction is for, and the prediction is within the issue's ±10% on the Qwen2.5-0.5B shape."""

from __future__ import annotations

import pytest

from ft.manifest import cuda_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU (nox -s gpu)"),
]

SIZE_ERROR_MAX = 0.10  # issue 4: predicted peak within ±10% of the measured one


def test_probe_measured_vs_predicted(backend, qwen05b_shape, tmp_path, run_ft, last_json):
    args = ["size", "--recipe", "tiny", "--model", str(qwen05b_shape), "--seq", "2048", "--micro-batch", "2"]
    for setting in (
        "model.quantization=nf4",
        "model.dtype=auto",
        "train.device=cuda",
        f"train.backend={backend}",
        "train.gradient_checkpointing=true",
    ):
        args += ["--set", setting]
    out = run_ft(*args, "--probe", "--json", cwd=tmp_path)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-6000:])
    report = last_json(out.stdout)
    probe, estimate = report["probe"], report["estimate"]
    assert probe["backend"] == report["backend"] == backend
    assert (
        (probe["micro_batch"], probe["seq_len"])
        == (2, 2048)
        == (
            estimate["inputs"]["micro_batch"],
            estimate["inputs"]["seq_len"],
        )
    )
    assert probe["tokens_per_s"] > 0 and report["eta"]["tokens_per_s_source"] == "measured by --probe"
    measured, predicted = probe["peak_allocated_bytes"], estimate["peak_allocated_bytes"]
    error = (predicted - measured) / measured
    print(
        f"\n{backend}: measured {measured / 2**30:.3f} GiB, predicted {predicted / 2**30:.3f} GiB ({error:+.1%})"
    )
    assert abs(error) <= SIZE_ERROR_MAX, (
        f"{backend}: prediction off by {error:+.1%} (loss path {probe['loss_path']})"
    )
