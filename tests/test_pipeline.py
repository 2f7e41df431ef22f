"""The whole loop on the tiny recipe, through the real CLI: check -> train -> eval -> package ->
verify -> reproduce. One run is shared by the tests in this file (about 30 s on 2 CPU cores)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from ft.cli import main


@pytest.fixture(scope="module")
def loop(tmp_path_factory, ft_cache):
    work = tmp_path_factory.mktemp("loop")
    cwd = os.getcwd()
    os.chdir(work)
    console = io.StringIO()
    try:
        with contextlib.redirect_stdout(console):
            assert main(["run", "--recipe", "tiny", "--set", "output.run_name=smoke"]) == 0
    finally:
        os.chdir(cwd)
        (work / "console.txt").write_text(console.getvalue())
    return work


def test_run_shows_each_stage_and_the_data_summary_on_the_console(loop):
    lines = (loop / "console.txt").read_text().splitlines()
    stages = [
        "check: reading the data and the tokenizer of builtin:tiny-qwen2",
        "data: ",
        "train: ",
        "eval: ",
    ]
    starts = [next(i for i, line in enumerate(lines) if line.startswith(s)) for s in stages]
    assert starts == sorted(starts)
    assert " rows on cpu, backend hf [" in lines[starts[2]] and "micro-batch 8 [" in lines[starts[2]]
    assert "held-out rows" in lines[starts[3]]
    data = [line for line in lines if line.startswith("data: ")]
    assert len(data) == 2
    assert (
        "rows from builtin:tickets.jsonl: " in data[0]
        and " train + " in data[0]
        and "(seeded split)" in data[0]
    )
    assert "tokens per row p50 " in data[1] and "train.max_seq_length 128" in data[1]


def test_adapter_has_a_model_card_naming_the_recipe_model(loop, tiny_model_dir):
    adapter = loop / "runs" / "smoke" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "builtin:tiny-qwen2"
    card = (adapter / "README.md").read_text()
    assert str(tiny_model_dir) not in card and str(loop) not in card
    assert "More Information Needed" not in card  # not PEFT's empty template
    assert card.startswith("---\nlibrary_name: peft\n")  # front matter; base_model only for a Hub id
    assert "# smoke: a LoRA adapter for `builtin:tiny-qwen2`" in card
    for fact in (
        "| recipe | `tiny` (sha256 ",
        "`builtin:tickets.jsonl` (320 rows)",
        "| LoRA | r 16, alpha 32",
        "../decision.md",
    ):
        assert fact in card, fact
    assert 'PeftModel.from_pretrained(base, "adapter")' in card


def test_model_card_front_matter_names_a_hub_base_model():
    from ft.config import load_settings
    from ft.train.card import render

    card = render(load_settings("default", ["model.revision=abc123"]), {"run": "r", "steps": 3})
    assert card.startswith("---\nbase_model: Qwen/Qwen2.5-0.5B-Instruct\nlibrary_name: peft\n")
    assert 'from_pretrained("Qwen/Qwen2.5-0.5B-Instruct", revision="abc123")' in card


def test_run_directory_is_self_describing(loop):
    run = loop / "runs" / "smoke"
    for name in (
        "recipe.resolved.yaml",
        "env.json",
        "data.json",
        "metrics.jsonl",
        "run.json",
        "decision.md",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/ft-adapter.json",
        "eval/report.json",
        "eval/report.md",
        "eval/predictions.jsonl",
        "eval/loss.png",
    ):
        assert (run / name).is_file(), name
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "complete" and meta["backend"] == "hf" and meta["device"] == "cpu"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if m["kind"] == "train"]
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_s"} <= set(train[0])
    assert (run / "eval" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_environment_manifest_is_complete_and_referenced_everywhere(loop):
    run = loop / "runs" / "smoke"
    env = json.loads((run / "env.json").read_text())
    for key in ("python", "os", "cpu", "gpu", "packages", "distributions", "lockfile", "git_commit", "run"):
        assert key in env, key
    assert {
        "torch",
        "transformers",
        "peft",
        "trl",
        "accelerate",
        "datasets",
        "bitsandbytes",
        "unsloth",
    } <= set(env["packages"])
    assert {"recipe_sha256", "data_sha256", "data", "seed", "started", "ended"} <= set(env["run"])
    from ft.fsutil import sha256_file

    env_sha = sha256_file(run / "env.json")
    assert json.loads((run / "eval" / "report.json").read_text())["env"]["sha256"] == env_sha
    assert json.loads((run / "adapter" / "ft-adapter.json").read_text())["env_sha256"] == env_sha
    assert env_sha in (run / "eval" / "report.md").read_text()
    assert env_sha in (run / "decision.md").read_text()
    assert json.loads((run / "data.json").read_text())["env"] == "env.json"


def test_tuned_beats_base_and_rule_keeps_it(loop):
    report = json.loads((loop / "runs" / "smoke" / "eval" / "report.json").read_text())
    base, tuned = report["metrics"]["base"], report["metrics"]["tuned"]
    assert tuned["schema_valid"] - base["schema_valid"] >= 0.5
    assert tuned["token_f1"] > base["token_f1"] + 0.3
    assert tuned["eval_loss"] < base["eval_loss"]
    assert report["decision"]["verdict"] == "KEEP"


def test_adapter_loads_with_peft(loop, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, str(loop / "runs" / "smoke" / "adapter"))
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_bundle_verifies_and_names_a_tampered_file(loop, capsys):
    archive = loop / "bundles" / "smoke.tar.gz"
    bundle = loop / "bundles" / "smoke"
    assert main(["verify", str(archive)]) == 0
    assert main(["verify", str(bundle)]) == 0
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert not any(n.endswith((".pt", ".pth", ".bin", ".pkl")) for n in names)
    target = bundle / "eval" / "report.json"
    original = target.read_bytes()
    try:
        target.write_bytes(original.replace(b"KEEP", b"KEEp", 1))
        capsys.readouterr()
        assert main(["verify", str(bundle)]) == 2
        assert "eval/report.json" in capsys.readouterr().err.splitlines()[-1]
    finally:
        target.write_bytes(original)


def test_reproduce_matches_the_sealed_run(loop, capsys):
    cwd = os.getcwd()
    os.chdir(loop)
    try:
        assert main(["reproduce", "bundles/smoke.tar.gz", "--work", "again"]) == 0
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "PASS" in out
    sealed = (loop / "runs" / "smoke" / "adapter" / "adapter_model.safetensors").read_bytes()
    rerun_dir = loop / "again" / "smoke-1" / "runs" / "rerun"  # each rerun gets its own again/smoke-<n>/
    rerun = (rerun_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert sealed == rerun


def test_bad_data_leaves_no_run_directory(tmp_path, capsys):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}\n')
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["run", "--recipe", "tiny", "--train", str(bad)]) == 2
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.jsonl:1" in err[0] and "messages[1].role" in err[0]
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["train.jsonl"]


@pytest.mark.slow
def test_reproduce_reconverts_the_export_and_compares_the_f16_gguf(loop, capsys):
    """Issue 10: `ft reproduce --export` re-exports the re-run and compares the f16 GGUF with the sealed one."""
    pytest.importorskip("llama_cpp")
    cwd = os.getcwd()
    os.chdir(loop)
    try:
        assert main(["export", "bundles/smoke.tar.gz", "--to", "gguf", "--quant", ""]) == 0
        capsys.readouterr()
        exported = "bundles/exports/smoke"
        assert (
            main(["reproduce", "bundles/smoke.tar.gz", "--work", "again-export", "--export", exported]) == 0
        )
        out = capsys.readouterr().out
        assert "Export (f16 GGUF, re-converted)" in out and "- identical" in out
        # An export made from another bundle is refused, naming the mismatch
        other = loop / "bundles" / "exports" / "smoke" / "export" / "report.json"
        assert other.is_file()
        assert (
            main(["reproduce", "bundles/smoke.tar.gz", "--work", "again-x", "--export", "bundles/smoke"]) == 2
        )
        assert "no export/gguf/model-f16.gguf" in capsys.readouterr().err
    finally:
        os.chdir(cwd)
