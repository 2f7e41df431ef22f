"""The bad-input corpus (tests/bad_inputs/cases.yaml) through the real CLI, in-process.

Each case must end with exit code 2 and exactly one stderr line, `error: ...`, naming the file, the
line (or [index]) and the field, with no traceback and no output directory left behind; the quirks
that are fine (a BOM, CRLF) must pass. The 1 GB single-line file is generated here (sparse, never
committed) and lives in the slow tier.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text(encoding="utf-8"))
BASE = ["data", "check", "--set", "data.label_field=null", "--set", "data.labels=null"]


def _as_list(value) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def argv_for(case: dict) -> list[str]:
    argv = [*BASE[:2], "--recipe", case.get("recipe", "tiny"), *BASE[2:]]
    for key in ("train", "eval"):
        if key in case:
            argv += ["--set", f"data.{key}={json.dumps(_as_list(case[key]))}"]
    for item in case.get("set", []):
        argv += ["--set", item]
    return argv


def make_input(path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inputs that cannot live in git: a directory, an unreadable file, a FIFO."""
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "unreadable":
        path.write_text('{"text": "secret"}\n', encoding="utf-8")
        path.chmod(0)
        if os.geteuid() == 0:
            # root reads through chmod 000; make the OS answer as it would for anyone else
            import ft.data.files

            def refuse(file, *args, **kwargs):
                if Path(file).name == path.name:
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
                return open(file, *args, **kwargs)

            monkeypatch.setattr(ft.data.files, "open", refuse, raising=False)
    else:
        raise ValueError(f"unknown make kind {kind!r}")


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from ft.cli import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny_model_dir) -> Path:
    """A scratch working directory holding a copy of the corpus files."""
    work = tmp_path / "work"
    shutil.copytree(CORPUS / "files", work)
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_bad_input(case, workdir, monkeypatch, capsys):
    for name, kind in case.get("make", {}).items():
        make_input(workdir / name, kind, monkeypatch)
    for name, value in case.get("env", {}).items():
        monkeypatch.setenv(name, value)
    before = sorted(p.name for p in workdir.iterdir())

    code, out, err = run_cli(argv_for(case), capsys)

    assert "Traceback" not in out + err
    if case.get("ok"):
        assert code == 0, err
        assert "rows read" in out
        return
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for expected in _as_list(case["expect"]):
        assert expected in lines[0]
    assert not (workdir / "runs").exists()
    assert sorted(p.name for p in workdir.iterdir()) == before  # nothing half-written left behind


def test_verbose_lists_every_problem_before_the_error_line(workdir, capsys):
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "bot", "content": "a"}]}
        for i in range(3)
    ]
    (workdir / "three_bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    argv = argv_for({"train": "three_bad.jsonl"})
    code, _out, err = run_cli(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and err.rstrip().endswith("(+2 more)")
    code, _out, err = run_cli([*argv, "--verbose"], capsys)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 4
    assert [line.split(":")[1] for line in lines[:3]] == ["1", "2", "3"]
    assert lines[3].startswith("error: three_bad.jsonl:1: messages[1].role: 'bot'")


def test_the_corpus_is_big_and_complete():
    names = [c["name"] for c in CASES]
    assert len(names) >= 30 and len(set(names)) == len(names)
    for case in CASES:
        assert case.get("ok") or case.get("expect"), case["name"]
        for key in ("train", "eval", "recipe"):
            for name in _as_list(case.get(key)):
                made = name in case.get("make", {})
                assert (
                    made
                    or name.startswith("builtin:")
                    or "no_such" in name
                    or (CORPUS / "files" / name).exists()
                ), name


@pytest.mark.slow
def test_a_1gb_single_line_is_refused_without_loading_it(workdir, capsys):
    import resource

    big = workdir / "big.jsonl"
    with open(big, "wb") as f:  # sparse: a few bytes on disk, 1 GiB long, one line
        f.write(b'{"text": "')
        f.seek(1 << 30)
        f.write(b'"}\n')
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, _out, err = run_cli(argv_for({"train": "big.jsonl"}), capsys)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert code == 2
    assert err.startswith("error: big.jsonl:1: line is longer than 64 MiB") and err.count("\n") == 1
    assert grown_mib < 400, f"peak RSS grew by {grown_mib:.0f} MiB"


def test_verbose_lists_every_problem_past_the_cap(workdir, capsys):
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}
    (workdir / "many_bad.jsonl").write_text((json.dumps(bad) + "\n") * 120, encoding="utf-8")
    code, _out, err = run_cli([*argv_for({"train": "many_bad.jsonl"}), "-v"], capsys)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 121, lines[-3:]
    assert [line.split(":")[1] for line in lines[:120]] == [str(i) for i in range(1, 121)]
    assert lines[-1].startswith("error: many_bad.jsonl:1: ") and lines[-1].endswith("(+119 more)")


NON_UTF8 = os.fsdecode(b"tickets-\xff.jsonl")  # how Python hands such a name over from argv


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_file_name_that_is_not_utf8_is_refused_by_check_and_run(command, workdir, capsys):
    shutil.copy(CORPUS / "files" / "three_tickets.jsonl", workdir / NON_UTF8)
    argv = argv_for({"train": NON_UTF8})
    if command == "run":
        argv = ["run", *argv[2:], "--set", "train.max_steps=1"]
    code, out, err = run_cli(argv, capsys)
    lines = err.splitlines()
    assert "Traceback" not in out + err
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: ") and "not valid UTF-8" in lines[0] and "rename" in lines[0]
    assert not (workdir / "runs").exists()
