"""`ft export` on a sealed tiny-model bundle: merged safetensors, GGUF f16/q8_0/q4_k_m through llama.cpp's
real converter, quantiser and loader, a Modelfile; each loaded back and scored; sealed and verified.
Hostile inputs get one line and exit 2. `ft run` exporting as its last step runs in `nox -s smoke`."""

from __future__ import annotations

import errno
import json
import shutil

import pytest

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


def _fake_run(root: Path) -> Path:
    """A finished, evaluated run of the tiny model without training it (seconds, not minutes): a LoRA with
    random non-zero B, its greedy answers on held-out ticket prompts as the eval's "tuned" predictions."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ft.config import load_settings
    from ft.eval.evaluate import load_schema_validator
    from ft.eval.metrics import average, score
    from ft.export.check import generate_hf
    from ft.fsutil import write_json, write_text
    from ft.manifest import capture
    from ft.testing import ensure_tiny_model, ticket_rows

    settings = load_settings("tiny", {"eval": {"max_new_tokens": 12}})
    run = root / "runs" / "exp"
    tiny = ensure_tiny_model()
    tok = AutoTokenizer.from_pretrained(tiny)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.eval()
    model.save_pretrained(run / "adapter")
    rows = ticket_rows(10, seed=5)
    prompts = [
        tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True) for r in rows
    ]
    refs = [r["messages"][-1]["content"] for r in rows]
    answers = generate_hf(model, tok, prompts, settings.eval.max_new_tokens, settings.eval.batch_size)
    validator, _ = load_schema_validator(settings.eval.json_schema)
    scores = [
        score(a, r, validator=validator, label_field="category") for a, r in zip(answers, refs, strict=True)
    ]
    preds = [
        {"id": i, "prompt": p, "reference": r, "base": a, "tuned": a, "base_scores": s, "tuned_scores": s}
        for i, (p, r, a, s) in enumerate(zip(prompts, refs, answers, scores, strict=True))
    ]
    write_text(run / "eval" / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in preds))
    metrics = average(scores)
    write_json(
        run / "eval" / "report.json",
        {
            "format": "ft-eval/1",
            "metrics": {"base": metrics, "tuned": metrics},
            "decision": {"verdict": "KEEP"},
        },
    )
    write_text(run / "recipe.resolved.yaml", settings.to_yaml())
    write_json(run / "env.json", capture(with_torch=False, full=False))
    write_json(run / "data.json", {"files": []})
    write_json(run / "run.json", {"name": "exp", "status": "complete", "completed": "2026-01-01T00:00:00Z"})
    return run


@pytest.fixture(scope="module")
def loop(tmp_path_factory, ft_cache):
    from ft.bundle import package

    work = tmp_path_factory.mktemp("export")
    run = _fake_run(work)
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
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_run_without_adapter_is_refused(loop, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(loop["run"], run)
    shutil.rmtree(run / "adapter")
    assert main(["export", str(run), "--to", "merged", "--out", str(tmp_path / "out")]) == 2
    assert "no adapter" in _one_line_error(capsys)


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
