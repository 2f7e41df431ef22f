"""Every built-in recipe resolves, sizes on the three GPUs of the README table, and its example data passes
`ft data check` under the recipe's own settings; the README's sizing table is what the script prints.

The data check needs the recipe model's tokenizer (the row lengths, the chat template). The real ones
(Qwen2.5's) would be a download, so the check runs with the tiny model's tokenizer in their place
(`--set model.name_or_path=builtin:tiny-qwen2`) and otherwise the recipe's own settings, but for two:
- The rows are rendered with the real model's chat template where ft has it built in
  (`data.chat_template=qwen2.5` for the Qwen2.5 recipes: the template those models ship), since the
  tiny model's plain ChatML has no tool support.
- Lengths: the tiny tokenizer is a 600-token byte-level BPE trained on ticket text; it cuts other text
  into far more tokens than Qwen's 151k vocabulary. Measured on the rendered example rows: 1.6
  characters a tiny token for json-extract, house-style-14b and tool-calls, 2.3 for voice-3b (short
  messages: the chat markers weigh more), 4.0 for default (the ticket text it was trained on); Qwen's
  is commonly ~3-4 on English and JSON (not measured: it needs the download). So the length policy is
  applied at TINY_TOKENS_PER_REAL x train.max_seq_length: where the tiny tokenizer needs at least that
  many tokens per real one, a row that fits here fits the recipe's limit under the real tokenizer. The
  rows of voice-3b and default are far inside their limits either way (at most 183 and 73 tiny tokens
  of 512). Checking a limit exactly needs the real tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from ft.cli import main
from ft.config import builtin_recipes, load_settings, resolve_path

ROOT = Path(__file__).parent.parent
RECIPES = sorted(builtin_recipes())
GPUS = ("rtx4090", "a100", "h100")
TINY = ["--set", "model.name_or_path=builtin:tiny-qwen2"]
TINY_TOKENS_PER_REAL = 2  # a lower bound: ~4 / ~1.6 characters a token (see the module docstring)
# The house style's sections, in order (ft/recipes/house-style-14b.yaml's header).
HOUSE_SECTIONS = ["Before you start", "Steps", "Check it worked", "If something goes wrong"]


def _json_out(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _answers(path: Path) -> list[str]:
    """The final assistant answer of every row of a messages / alpaca / sharegpt JSONL file."""
    from ft.data.shapes import normalise

    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        _, messages, _ = normalise(json.loads(line), "auto")
        out.append(messages[-1]["content"])
    return out


def test_the_real_job_recipes_are_built_in():
    assert {"default", "tiny", "json-extract", "house-style-14b", "voice-3b"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_resolves_and_says_how_to_run_it(name):
    s = load_settings(name)
    assert s.name == name and s.description
    assert f"ft run --recipe {name}" in builtin_recipes()[name].read_text(encoding="utf-8")
    for spec in s.data.train + s.data.eval:
        assert resolve_path(spec).is_file()
    if isinstance(s.eval.json_schema, str):
        assert resolve_path(s.eval.json_schema).is_file()


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_sizes_on_each_gpu(name, tiny_model_dir, capsys):
    for gpu in GPUS:
        r = _json_out(capsys, ["size", "--recipe", name, "--gpu", gpu, "--json"])
        assert r["fits"] is True, f"{name} does not fit {gpu}"
        assert r["max_micro_batch"] >= 1
        assert r["eta"]["seconds"] > 0
        assert r["eta"]["steps"] >= 1


def _as_real(settings) -> list[str]:
    """Overrides that make the tiny tokenizer stand in for the recipe's real one (module docstring)."""
    out = ["--set", f"train.max_seq_length={TINY_TOKENS_PER_REAL * settings.train.max_seq_length}"]
    if settings.model.name_or_path.startswith("Qwen/Qwen2.5-") and settings.data.chat_template is None:
        out += ["--set", "data.chat_template=qwen2.5"]
    return out


@pytest.mark.parametrize("name", RECIPES)
def test_example_data_passes_the_check(name, tiny_model_dir, capsys):
    s = load_settings(name)
    argv = ["data", "check", "--recipe", name, *TINY, *(_as_real(s) if name != "tiny" else []), "--json"]
    report = _json_out(capsys, argv)
    assert report["rows"]["train"] > 0 and report["rows"]["eval"] > 0
    assert report["dropped"]["too_long"]["count"] == 0
    assert report["dropped"]["prompt_fills_window"]["count"] == 0


def test_json_extract_answers_satisfy_its_own_schema():
    from ft.eval.evaluate import load_schema_validator

    s = load_settings("json-extract")
    assert s.eval.primary_metric == "exact_match" and "label_accuracy" in s.eval.guard_metrics
    validator, schema = load_schema_validator(s.eval.json_schema)
    answers = _answers(resolve_path(s.data.train[0]))
    assert 60 <= len(answers) <= 300
    labels = set()
    for answer in answers:
        parsed = json.loads(answer)
        assert not list(validator.iter_errors(parsed)), answer
        labels.add(parsed[s.data.label_field])
    assert labels == set(s.data.labels)  # every class has examples
    assert schema["properties"][s.data.label_field]["enum"] == s.data.labels


def test_house_style_answers_follow_the_house_template():
    from ft.eval.format_checks import headings

    s = load_settings("house-style-14b")
    assert s.model.name_or_path == "Qwen/Qwen2.5-14B-Instruct" and s.model.quantization == "nf4"
    assert s.train.max_seq_length == 4096
    assert s.eval.primary_metric == "headings_match" and s.eval.guard_metrics == ["eval_loss"]
    answers = _answers(resolve_path(s.data.train[0]))
    assert 20 <= len(answers) <= 300
    for answer in answers:
        found = headings(answer)
        assert found[0][0] == 1 and [t for lvl, t in found[1:] if lvl == 2] == HOUSE_SECTIONS, answer[:80]


def test_voice_sample_is_sharegpt_and_sized_for_the_full_file(capsys):
    s = load_settings("voice-3b")
    assert s.model.name_or_path == "Qwen/Qwen2.5-3B-Instruct" and s.train.epochs == 3
    rows = resolve_path(s.data.train[0]).read_text(encoding="utf-8").splitlines()
    assert 150 <= len(rows) <= 600
    assert all("conversations" in json.loads(r) for r in rows)
    r = _json_out(
        capsys,
        ["size", "--recipe", "voice-3b", "--gpu", "a100", "--rows", "75k", "--tokens", "3.1M", "--json"],
    )
    held = min(math.ceil(75_000 * s.data.eval_fraction), s.data.eval_max_rows)
    train_rows = 75_000 - held
    assert r["eta"]["rows"] == train_rows
    assert r["eta"]["steps"] == math.ceil(math.ceil(train_rows / s.train.effective_batch) * 3)
    # Three passes over the training share of 3.1M tokens (steps round the last batch of each pass up).
    assert r["eta"]["tokens"] == pytest.approx(3 * 3.1e6 * train_rows / 75_000, rel=0.002)
    assert "--tokens" in r["eta"]["tokens_source"] and "--rows" in r["eta"]["rows_source"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tokens", "3.1M"], "--tokens needs --rows"),
        (["--rows", "0"], "--rows 0: must be a whole number of at least 1"),
        (["--rows", "lots"], "--rows lots: must be a whole number of at least 1"),
        (["--rows", "10", "--tokens", "2.5"], "--tokens 2.5: must be a whole number of at least 1"),
    ],
)
def test_stated_data_size_errors_are_one_line(argv, message, capsys):
    assert main(["size", "--recipe", "default", "--gpu", "h100", *argv]) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")


def _sizes_script():
    spec = importlib.util.spec_from_file_location("recipe_sizes", ROOT / "benchmarks" / "recipe_sizes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_sizing_table_is_what_the_script_predicts():
    """Refresh with `python benchmarks/recipe_sizes.py --write` when a recipe or the sizing model changes."""
    script = _sizes_script()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = readme.index(script.START), readme.index(script.END)
    block = readme[start:end]
    table = script.table()
    assert table in block, "README's recipe table is stale: run `python benchmarks/recipe_sizes.py --write`"
    assert set(script.recipes()) == set(RECIPES) - {"tiny"}
