"""The entrypoint: instant help, one-line errors with exit code 2, no logic of its own."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ft.cli import main


def test_help_starts_with_an_example(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "examples:\n  ft run" in out
    for command in ("run", "data", "size", "train", "eval", "package", "verify", "reproduce", "env"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "example:" in capsys.readouterr().out


def test_help_imports_no_heavy_library():
    code = (
        "import sys\n"
        "from ft.cli import build_parser\n"
        "build_parser().format_help()\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets', 'unsloth', 'pydantic') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_user_error_is_one_line_exit_2(capsys):
    assert main(["data", "check", "--recipe", "tiny", "--set", "train.epocs=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: --set: train.epocs: unknown key; did you mean 'epochs'?")
    assert "Traceback" not in err


def test_debug_shows_the_traceback():
    from ft.errors import FtError

    with pytest.raises(FtError):
        main(["data", "check", "--recipe", "tiny", "--set", "train.epocs=2", "--debug"])


def test_env_short(capsys):
    assert main(["env", "--short"]) == 0
    assert "python" in capsys.readouterr().out


def test_recipes_list_and_reference(capsys):
    assert main(["recipes", "--reference"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "train.learning_rate" in out
