"""`ft COMMAND --help` explains every argument: positionals and `--json` included."""

from __future__ import annotations

import argparse

from ft.cli import build_parser


def _parsers(parser: argparse.ArgumentParser, path: str = "ft"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_argument_has_help_text():
    missing = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(
                action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
            ):
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.metavar or action.dest}")
    assert not missing, "arguments without help: " + ", ".join(missing)
