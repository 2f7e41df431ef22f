"""Keep README.md true: every setting is in its recipe reference, and its commands exist."""

from __future__ import annotations

from pathlib import Path

from ft.cli import build_parser
from ft.config import field_docs

README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")


def test_recipe_reference_lists_every_setting_with_its_default():
    for key, default, _doc in field_docs():
        assert f"| `{key}` | `{default}` |" in README, f"README recipe reference is missing {key}"


def test_commands_in_readme_exist():
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    for command in (
        "run",
        "size",
        "data",
        "train",
        "eval",
        "package",
        "verify",
        "reproduce",
        "env",
        "recipes",
        "keygen",
    ):
        assert f"ft {command}" in README
        assert command in commands


def test_quick_start_has_the_two_commands():
    assert "docker compose run --rm train" in README
    assert "pip install nox uv && nox" in README
