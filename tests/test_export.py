"""`ft export` on a sealed tiny-model bundle: merged safetensors, GGUF f16/q8_0/q4_k_m through llama.cpp's
real converter, quantiser and loader, a Modelfile; each loaded back and scored; sealed and verified.
Hostile inputs get one line and exit 2. `ft run` exporting as its last step runs in `nox -s smoke`."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
from export_fixtures import fake_run

from ft.cli import main


def _converter_ready() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    from ft.export import llamacpp

    return (llamacpp.converter_dir() / "convert_hf_to_gguf.py").is_file()


needs_llama = pytest.mark.skipif(
    not _converter_ready(),
    reason="llama-cpp-python or its converter is not installed (`python -m ft.export.llamacpp install SDIST`)",
)


@pytest.fixture(scope="module")
def loop(tmp_path_factory, ft_cache):
    from ft.bundle import package

    work = tmp_path_factory.mktemp("export")
    run = fake_run(work)
    bundle = package(run, work / "bundles", archive=False)
    formats = "all" if _converter_ready() else "merged"
    assert main(["export", str(bundle), "--to", formats]) == 0
    return {"work": work, "run": run, "bundle": bundle, "export": work / "bundles" / "exports" / "exp"}


def _report(loop) -> dict:
    return json.loads((loop["export"] / "export" / "report.json").read_text())


def test_export_is_checked_sealed_and_verifies(loop, capsys):
    report = _report(loop)
    rows = {r["format"]: r for r in report["formats_checked"]}
    assert "merged" in rows
    for r in rows.values():
        assert not r["breaches"], r
        assert set(r["metrics"]) == set(r["adapter_metrics"])
        assert r["bytes"] > 0 and r["load_s"] >= 0 and r["tokens_per_s"]
    md = (loop["export"] / "export" / "report.md").read_text()
    assert "| merged |" in md and "identical answers" in md
    assert (loop["export"] / "export" / "merged" / "model.safetensors").is_file()
    manifest = json.loads((loop["export"] / "MANIFEST.json").read_text())
    listed = {e["path"] for e in manifest["files"]}
    assert {
        "export/report.json",
        "export/report.md",
        "export/merged/config.json",
        "adapter/adapter_config.json",
    } <= listed
    assert main(["verify", str(loop["export"])]) == 0


def test_merged_logits_match_the_adapter(loop):
    """Merged weights answer like base+adapter: logits within the stated fp32 tolerance."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ft.export.check import LOGIT_TOLERANCE
    from ft.testing import ensure_tiny_model

    rows = [
        json.loads(x) for x in (loop["bundle"] / "eval" / "predictions.jsonl").read_text().splitlines()[:3]
    ]
    tok = AutoTokenizer.from_pretrained(loop["export"] / "export" / "merged")
    base = AutoModelForCausalLM.from_pretrained(ensure_tiny_model(), dtype=torch.float32)
    adapter = PeftModel.from_pretrained(base, str(loop["bundle"] / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(loop["export"] / "export" / "merged").eval()
    with torch.inference_mode():
        for row in rows:
            ids = tok(row["prompt"], return_tensors="pt", add_special_tokens=False)
            diff = (adapter(**ids).logits - merged(**ids).logits).abs().max().item()
            assert diff < LOGIT_TOLERANCE["float32"]
    assert _report(loop)["formats_checked"][0]["max_logit_diff"] < LOGIT_TOLERANCE["float32"]


@needs_llama
def test_gguf_formats_load_back_in_llama_cpp(loop):
    from ft.export import llamacpp

    report = _report(loop)
    rows = {r["format"]: r for r in report["formats_checked"]}
    assert set(rows) == {"merged", "f16", "q8_0", "q4_k_m"}
    gguf = loop["export"] / "export" / "gguf"
    for fmt in ("f16", "q8_0", "q4_k_m"):
        assert (gguf / f"model-{fmt}.gguf").read_bytes()[:4] == b"GGUF"
        assert rows[fmt]["chat_template_embedded"] is True
        assert rows[fmt]["prompt_tokens_identical"] == 1.0
    assert "Q8_0" in rows["q8_0"]["tensor_types"]
    assert report["llama_cpp"]["llama_cpp_python"] == llamacpp.VERSION
    assert report["llama_cpp"]["sdist_sha256"] == llamacpp.SDIST_SHA256
    modelfile = (gguf / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-q8_0.gguf\n") and "PARAMETER stop <|im_end|>" in modelfile


@needs_llama
def test_tampered_gguf_fails_verify(loop, tmp_path, capsys):
    copy = tmp_path / "exp"
    shutil.copytree(loop["export"], copy)
    target = copy / "export" / "gguf" / "model-q4_k_m.gguf"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    assert main(["verify", str(copy)]) != 0
    assert "model-q4_k_m.gguf" in capsys.readouterr().err


def _one_line_error(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors  # progress lines may come before it; the error itself is one line
    return errors[0]


def test_run_without_adapter_is_refused(loop, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(loop["run"], run)
    shutil.rmtree(run / "adapter")
    assert main(["export", str(run), "--to", "merged", "--out", str(tmp_path / "out")]) == 2
    assert "no adapter" in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()  # nothing created for a refused export


def test_run_that_failed_eval_is_refused(loop, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(loop["run"], run)
    report = json.loads((run / "eval" / "report.json").read_text())
    report["decision"]["verdict"] = "DISCARD"
    (run / "eval" / "report.json").write_text(json.dumps(report))
    assert main(["export", str(run), "--to", "merged", "--out", str(tmp_path / "out")]) == 2
    assert "'DISCARD', not KEEP" in _one_line_error(capsys)
    assert not (tmp_path / "out" / "exp").exists()


def test_unknown_quantisation_is_refused(loop, tmp_path, capsys):
    assert (
        main(["export", str(loop["bundle"]), "--to", "gguf", "--quant", "q3_bogus", "--out", str(tmp_path)])
        == 2
    )
    assert "unknown quantisation 'q3_bogus'" in _one_line_error(capsys)
    assert not any(p for p in tmp_path.iterdir() if not p.name.startswith("."))


def test_full_disk_mid_export_keeps_the_previous_export(loop, tmp_path, monkeypatch, capsys):
    out = tmp_path / "exports"
    assert main(["export", str(loop["bundle"]), "--to", "merged", "--out", str(out)]) == 0
    before = (out / "exp" / "MANIFEST.json").read_bytes()
    capsys.readouterr()
    from ft.export import check

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(check, "run_merged", full)
    assert main(["export", str(loop["bundle"]), "--to", "merged", "--out", str(out)]) == 2
    assert "no space left" in _one_line_error(capsys)
    assert (out / "exp" / "MANIFEST.json").read_bytes() == before
    assert main(["verify", str(out / "exp")]) == 0
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_metric_drop_fails_names_the_metric_and_keeps_files(loop, tmp_path, monkeypatch, capsys):
    from ft.export import check

    real = check.score_answers

    def worse(settings, ref, answers):
        scores = real(settings, ref, answers)
        return {**scores, "json_valid": scores["json_valid"] - 0.5}

    monkeypatch.setattr(check, "score_answers", worse)
    assert main(["export", str(loop["bundle"]), "--to", "merged", "--out", str(tmp_path)]) == 2
    err = _one_line_error(capsys)
    assert "merged json_valid dropped 0.500" in err and "files kept" in err
    assert main(["verify", str(tmp_path / "exp")]) == 0


@needs_llama
def test_k_quants_are_real_at_widths_of_256(tmp_path):
    """At the tiny model's width 64 llama.cpp falls back from Q4_K to Q5_0 (the report shows the tensor
    types); at multiples of 256 q4_k_m really is Q4_K, through the same converter and quantiser."""
    from ft.export import llamacpp
    from ft.testing import build_tiny_model

    model = build_tiny_model(tmp_path / "m", hidden=256)
    f16 = tmp_path / "f16.gguf"
    llamacpp.convert(model, f16, pre_tokenizer="qwen2")
    llamacpp.quantize(f16, tmp_path / "q4.gguf", "q4_k_m")
    types = llamacpp.tensor_types(tmp_path / "q4.gguf")
    assert types.get("Q4_K", 0) >= 8, types


def test_export_from_an_archive(loop, tmp_path, capsys):
    """A .tar.gz bundle (what `nox -s export` copies out) is verified, unpacked and exported."""
    from ft.bundle import package

    package(loop["run"], tmp_path / "bundles", archive=True)
    archive = tmp_path / "bundles" / "exp.tar.gz"
    assert main(["export", str(archive), "--to", "merged"]) == 0
    assert main(["verify", str(tmp_path / "bundles" / "exports" / "exp")]) == 0
    assert not [p.name for p in (tmp_path / "bundles" / "exports").iterdir() if p.name.startswith(".")]


@needs_llama
def test_f16_conversion_is_byte_reproducible(loop, tmp_path):
    """Converting the sealed merged model again gives the sealed f16 GGUF bit for bit (what a re-export by
    `ft reproduce` would compare)."""
    from ft.export import llamacpp
    from ft.fsutil import sha256_file

    again = tmp_path / "f16.gguf"
    llamacpp.convert(loop["export"] / "export" / "merged", again, pre_tokenizer="qwen2")
    assert sha256_file(again) == sha256_file(loop["export"] / "export" / "gguf" / "model-f16.gguf")
