"""The recipe: sources and their order, unknown keys, types, cross-field rules, dumping."""

from __future__ import annotations

import pytest
import yaml

from ft.config import builtin_recipes, field_docs, load_settings, settings_from_dict
from ft.errors import FtError


def test_builtin_recipes_load_and_resolve():
    assert {"default", "tiny"} <= set(builtin_recipes())
    default = load_settings("default")
    assert default.name == "default"
    assert default.model.name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"
    tiny = load_settings("tiny")
    assert tiny.model.name_or_path == "builtin:tiny-qwen2"
    assert tiny.train.device == "cpu"


def test_source_precedence_defaults_recipe_env_cli(tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nlora: {r: 8}\ntrain: {learning_rate: 0.001, epochs: 3}\n")
    s = load_settings(recipe)
    assert (s.lora.r, s.train.learning_rate, s.lora.alpha) == (8, 0.001, 32)  # recipe beats default
    monkeypatch.setenv("FT_TRAIN__LEARNING_RATE", "0.005")
    monkeypatch.setenv("FT_LORA__R", "4")
    s = load_settings(recipe)
    assert (s.lora.r, s.train.learning_rate, s.train.epochs) == (4, 0.005, 3)  # env beats recipe
    s = load_settings(recipe, ["lora.r=2"])
    assert (s.lora.r, s.train.learning_rate) == (2, 0.005)  # CLI beats env


def test_list_values_from_env_and_cli(monkeypatch):
    monkeypatch.setenv("FT_LORA__TARGET_MODULES", '["q_proj", "v_proj"]')
    assert load_settings("tiny").lora.target_modules == ["q_proj", "v_proj"]
    s = load_settings("tiny", ["data.train=[a.jsonl, b.jsonl]"])
    assert s.data.train == ["a.jsonl", "b.jsonl"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.learnin_rate=1"], "--set: train.learnin_rate: unknown key; did you mean 'learning_rate'?"),
        (["lora.rank=4"], "lora.rank: unknown key"),
        (["train.learning_rate=-1"], "train.learning_rate: Input should be greater than 0 (got -1)"),
        (["lora.r=abc"], "lora.r: Input should be a valid integer"),
        (["train.backend=fast"], "train.backend: Input should be 'auto', 'unsloth' or 'hf'"),
        (["model.quantization=nf4"], "nf4 (4-bit loading) needs CUDA, but train.device is cpu"),
        (["train.micro_batch=3"], "must be a multiple of train.micro_batch"),
        (
            [
                "eval.primary_metric=label_accuracy",
                "eval.guard_metrics=[]",
                "data.label_field=null",
                "data.labels=null",
            ],
            "label_accuracy needs data.label_field",
        ),
    ],
)
def test_bad_overrides_are_one_line_errors(overrides, expected):
    with pytest.raises(FtError) as exc:
        load_settings("tiny", overrides)
    assert expected in str(exc.value)
    assert "\n" not in str(exc.value)


def test_unknown_key_in_recipe_file_names_the_file(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  epocs: 3\n")
    with pytest.raises(FtError, match=r"bad.yaml: train.epocs: unknown key; did you mean 'epochs'\?"):
        load_settings(recipe)


def test_bad_env_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("FT_TRAIN__EPOCHS", "many")
    with pytest.raises(FtError, match="environment FT_TRAIN__EPOCHS: train.epochs"):
        load_settings("tiny")


def test_recipe_file_problems(tmp_path):
    with pytest.raises(FtError, match="not a file and not a built-in recipe; did you mean 'tiny'"):
        load_settings("tinny")
    with pytest.raises(FtError, match="is a directory"):
        load_settings(tmp_path)
    bad = tmp_path / "x.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(FtError, match=r"x.yaml:\d+: invalid YAML"):
        load_settings(bad)
    bad.write_text("- a list\n")
    with pytest.raises(FtError, match="must be a mapping"):
        load_settings(bad)


def test_resolved_yaml_round_trips_with_stable_hash():
    s = load_settings("tiny", ["lora.r=4"])
    again = settings_from_dict(yaml.safe_load(s.to_yaml()))
    assert again == s
    assert again.sha256 == s.sha256
    assert load_settings("tiny").sha256 != s.sha256


def test_every_setting_is_documented():
    assert [key for key, _default, doc in field_docs() if not doc] == []
