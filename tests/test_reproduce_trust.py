"""`ft reproduce` never runs code from a bundle, and every rerun gets its own work folder (issue 9.1, 9.3).

The malicious bundle here is real: a model folder inside adapter/ holds Python files that write a marker
when imported, and a config.json/tokenizer_config.json whose auto_map points transformers at them.
`test_the_payload_is_real` shows that loading it with trust_remote_code does run it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ft.bundle import package, signing

PAYLOAD = """\
import pathlib
pathlib.Path({marker!r}).write_text("the bundle's code ran")
from transformers import {base}


class {cls}({base}):
    model_type = "evilcfg"
"""


def evil_model(folder: Path, marker: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps({"model_type": "evilcfg", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}})
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}})
    )
    (folder / "configuration_evil.py").write_text(
        PAYLOAD.format(marker=str(marker), base="PretrainedConfig", cls="EvilConfig")
    )
    (folder / "tokenization_evil.py").write_text(
        PAYLOAD.format(marker=str(marker), base="PreTrainedTokenizer", cls="EvilTokenizer")
    )


def tiny_recipe(**model) -> dict:
    from ft.config import load_settings

    recipe = load_settings("tiny", []).model_dump(mode="json")
    recipe["model"].update(model)
    return recipe


def make_run(root: Path, name: str, recipe: dict, *, marker: Path | None = None) -> Path:
    """A finished run whose data is the built-in tickets file (found again by sha256 when rerun)."""
    from ft.config import builtin_data_path

    run = root / "runs" / name
    (run / "eval").mkdir(parents=True)
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text('{"r": 16}')
    if marker is not None:
        evil_model(run / "adapter" / "evil-model", marker)
    (run / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe))
    data = builtin_data_path("tickets.jsonl").read_bytes()
    entry = {"role": "train", "name": "builtin:tickets.jsonl", "sha256": hashlib.sha256(data).hexdigest()}
    report = {
        "decision": {"verdict": "KEEP", "reasons": []},
        "metrics": {"base": {}, "tuned": {"exact_match": 0.5}},
    }
    for rel, obj in {
        "run.json": {"name": name, "status": "complete", "ended": "2026-01-01T00:00:00Z"},
        "env.json": {"python": "3.11.7", "packages": {}},
        "data.json": {"files": [entry]},
        "eval/report.json": report,
    }.items():
        (run / rel).write_text(json.dumps(obj))
    return run


@pytest.fixture
def hf_env(tmp_path) -> dict[str, str]:
    """A private Hugging Face modules cache, so the test can see whether anything was written to it."""
    return {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_MODULES_CACHE": str(tmp_path / "hf-modules"),
        "PYTHONHASHSEED": "0",
    }


def ft(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ft", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def assert_no_code_ran(tmp_path: Path, marker: Path, work: Path) -> None:
    assert not marker.exists(), "the bundle's Python file was imported"
    modules = tmp_path / "hf-modules"
    assert not modules.exists() or not any(modules.rglob("*.py")), "the HF modules cache was written"
    assert not work.exists() or not any(work.iterdir()), "the refused rerun left files behind"


def test_the_payload_is_real(tmp_path, hf_env):
    marker = tmp_path / "marker"
    evil_model(tmp_path / "m", marker)
    code = "from transformers import AutoConfig; AutoConfig.from_pretrained(%r, trust_remote_code=True)"
    subprocess.run(
        [sys.executable, "-c", code % str(tmp_path / "m")], env=hf_env, capture_output=True, timeout=300
    )
    assert marker.exists(), "control: loading the folder with trust_remote_code runs its code"


def test_trust_remote_code_in_a_bundle_is_refused_without_the_flag(tmp_path, hf_env):
    """The reported attack: an unsigned bundle whose recipe loads its own model folder with its own code."""
    marker = tmp_path / "marker"
    out = tmp_path / "bundles"
    inside = out / "evil" / "adapter" / "evil-model"
    package(
        make_run(
            tmp_path, "evil", tiny_recipe(name_or_path=str(inside), trust_remote_code=True), marker=marker
        ),
        out,
    )
    assert ft(tmp_path, hf_env, "verify", str(out / "evil")).returncode == 0, "it is a well-formed bundle"
    work = tmp_path / "work"
    proc = ft(tmp_path, hf_env, "reproduce", str(out / "evil"), "--work", str(work))
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip()
    assert (
        "\n" not in line
        and "model.trust_remote_code is true: refusing" in line
        and "--trust-remote-code" in line
    )
    assert_no_code_ran(tmp_path, marker, work)


def test_the_flag_needs_a_signature_checked_with_a_key(tmp_path, hf_env):
    marker = tmp_path / "marker"
    private, public = signing.generate_keypair(tmp_path / "k" / "ft.key", tmp_path / "k" / "ft.pub")
    recipe = tiny_recipe(name_or_path="some-org/remote-code-model", trust_remote_code=True)
    unsigned = package(make_run(tmp_path / "u", "u", recipe), tmp_path / "bundles")
    signed = package(make_run(tmp_path / "s", "s", recipe), tmp_path / "bundles", sign_key=private)
    work = tmp_path / "work"
    for bundle, extra, why in (
        (unsigned, [], "the bundle is unsigned"),
        (signed, [], "no --key given"),
    ):
        proc = ft(
            tmp_path, hf_env, "reproduce", str(bundle), "--work", str(work), "--trust-remote-code", *extra
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "signature was not checked" in proc.stderr and why in proc.stderr
    proc = ft(tmp_path, hf_env, "reproduce", str(unsigned), "--work", str(work), "--key", str(public))
    assert proc.returncode == 2 and "MANIFEST.json.sig: missing" in proc.stderr
    assert_no_code_ran(tmp_path, marker, work)


@pytest.mark.parametrize("trust", [True, False])
def test_a_model_inside_the_bundle_is_never_loaded(tmp_path, hf_env, trust):
    """Even signed, checked with --key and with --trust-remote-code: the model folder is the bundle's."""
    marker = tmp_path / "marker"
    private, public = signing.generate_keypair(tmp_path / "k" / "ft.key", tmp_path / "k" / "ft.pub")
    out = tmp_path / "bundles"
    inside = out / "evil" / "adapter" / "evil-model"
    recipe = tiny_recipe(name_or_path=str(inside), trust_remote_code=trust)
    package(make_run(tmp_path, "evil", recipe, marker=marker), out, sign_key=private)
    work = tmp_path / "work"
    flags = ["--key", str(public)] + (["--trust-remote-code"] if trust else [])
    proc = ft(tmp_path, hf_env, "reproduce", str(out / "evil"), "--work", str(work), *flags)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is inside a bundle" in proc.stderr and "never loads a model shipped in a bundle" in proc.stderr
    assert_no_code_ran(tmp_path, marker, work)


def test_a_model_inside_the_extracted_archive_is_never_loaded(tmp_path, hf_env):
    """The archive case: the recipe aims at where `ft reproduce --work` will unpack it."""
    marker = tmp_path / "marker"
    work = tmp_path / "work"
    inside = work / "evil-1" / "bundle" / "evil" / "adapter" / "evil-model"
    package(
        make_run(tmp_path, "evil", tiny_recipe(name_or_path=str(inside)), marker=marker), tmp_path / "bundles"
    )
    proc = ft(tmp_path, hf_env, "reproduce", str(tmp_path / "bundles" / "evil.tar.gz"), "--work", str(work))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is inside a bundle" in proc.stderr
    assert_no_code_ran(tmp_path, marker, work)


# ---------------------------------------------------------------- a fresh work folder per rerun


@pytest.fixture
def fake_training(monkeypatch):
    """The rerun's stages replaced by ones that give back the sealed report: only the folders are real."""
    from ft import backends, manifest, pipeline

    report = {
        "decision": {"verdict": "KEEP", "reasons": []},
        "metrics": {"base": {}, "tuned": {"exact_match": 0.5}},
    }

    def check_data(settings):
        """What the real check records of the files the rerun was pointed at: their sha256."""
        from types import SimpleNamespace

        from ft.config import resolve_path

        files = [
            {"role": "train", "name": p, "sha256": hashlib.sha256(resolve_path(p).read_bytes()).hexdigest()}
            for p in settings.data.train
        ]
        return SimpleNamespace(settings=settings, check=SimpleNamespace(report={"files": files}))

    def create_run(prep):
        settings = prep.settings
        run_dir = Path(settings.output.dir) / settings.output.run_name
        run_dir.mkdir(parents=True)
        return run_dir

    monkeypatch.setattr(backends, "prepare", lambda settings: None)
    monkeypatch.setattr(pipeline, "check_data", check_data)
    monkeypatch.setattr(pipeline, "create_run", create_run)
    monkeypatch.setattr(pipeline, "train_stage", lambda *a, **k: None)
    monkeypatch.setattr(pipeline, "eval_stage", lambda prep, run_dir: report)
    monkeypatch.setattr(manifest, "capture", lambda **k: {"python": "3.11.7", "packages": {}})


def test_reproducing_the_same_bundle_twice_uses_a_fresh_folder_each_time(tmp_path, fake_training, capsys):
    from ft.cli import main

    package(make_run(tmp_path, "twice", tiny_recipe()), tmp_path / "bundles")
    work = tmp_path / "work"
    for target in (tmp_path / "bundles" / "twice.tar.gz", tmp_path / "bundles" / "twice"):
        assert main(["reproduce", str(target), "--work", str(work)]) == 0, capsys.readouterr().err
        assert main(["reproduce", str(target), "--work", str(work)]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in work.iterdir()) == ["twice-1", "twice-2", "twice-3", "twice-4"]
    assert (work / "twice-2" / "bundle" / "twice" / "MANIFEST.json").is_file()
    assert (work / "twice-2" / "runs" / "rerun").is_dir()
    assert "PASS" in capsys.readouterr().out
