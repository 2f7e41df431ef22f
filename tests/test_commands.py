"""Every command ft prints or documents works: parsed by the real CLI parser, or run where cheap.

Sources: README.md's and env/README.md's code blocks (and their inline `docker compose run` spans),
compose.yaml's and the Dockerfile's comments, every `--help` example, and the README that `ft package`
writes into a bundle. `ft ...` lines go through `ft.cli.build_parser`; `docker compose run --rm SERVICE
ARGS` lines are resolved the way Compose resolves them (the service's entrypoint from compose.yaml, then
ARGS) and the result goes through the same parser, with its file arguments checked against the
service's mounts; `nox -s NAME` must name a session of noxfile.py. The bundle README's `ft verify`
lines are executed against the bundle. No Docker engine is needed.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import re
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml

from ft.cli import MAIN_HELP, build_parser

ROOT = Path(__file__).parent.parent
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))
SERVICES: dict = COMPOSE["services"]
# Tools a documented line may start with that this test does not check (shell, installers, the host).
UNCHECKED = {"mkdir", "printf", "sudo", "sha256sum", "head", "cat", "python", "git"}
# Values of these argparse destinations are paths inside the container when run through compose;
# the ones written to must not be on a read-only mount.
PATH_DESTS = {"bundle", "run_dir", "key", "sign_key", "train_files", "eval_files", "target"}
WRITTEN_DESTS = {"work", "out", "private", "public"}


# -- reading the documents ----------------------------------------------------------------------------
def code_lines(markdown: str) -> list[str]:
    """Lines of fenced shell blocks and indented code blocks, plus inline `docker compose run` spans."""
    out: list[str] = []
    fence: str | None = None
    indented = False
    previous_blank = True
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fence = line.strip()[3:].strip() if fence is None else None
            continue
        if fence is not None:
            if fence in ("", "sh", "bash", "shell", "console"):
                out.append(line)
            continue
        if line.startswith("    ") and (previous_blank or indented):
            indented = True
            out.append(line[4:])
        elif line.strip():
            indented = False
            out += re.findall(r"`((?:[A-Z_]+=\S+ )*docker compose run[^`]*)`", line)
        previous_blank = not line.strip()
    return _join_continued([line.strip() for line in out if line.strip()])


def _join_continued(lines: list[str]) -> list[str]:
    """A command continued with a trailing backslash is one command."""
    joined: list[str] = []
    carry = ""
    for line in lines:
        if line.endswith("\\"):
            carry += line[:-1].rstrip() + " "
            continue
        joined.append(carry + line)
        carry = ""
    return joined + ([carry.strip()] if carry else [])


def ft_module_argv(tokens: list[str]) -> list[str] | None:
    """The ft arguments of a launcher line that runs `... -m ft ARGS` (torchrun, accelerate, docker run)."""
    for i in range(len(tokens) - 1):
        if tokens[i] == "-m" and tokens[i + 1] == "ft":
            return tokens[i + 2 :]
    return None


def _entrypoint_ft_argv(entrypoint: list[str]) -> list[str] | None:
    """The ft arguments an entrypoint starts with: `ft ...`, or a `sh -c '... -m ft run "$@"'` wrapper."""
    if entrypoint[:1] == ["ft"]:
        return entrypoint[1:]
    if entrypoint[:2] == ["sh", "-c"] and len(entrypoint) > 2:
        words = shlex.split(entrypoint[2].replace("$$", "$"))
        argv = ft_module_argv(words)
        if argv is not None and argv[-1:] == ["$@"]:
            return argv[:-1]
    return None


def comment_commands(text: str) -> list[str]:
    """Commands quoted in `#` comments (compose.yaml, Dockerfile): from a known tool to the line's end."""
    found = []
    for line in text.splitlines():
        if not line.lstrip().startswith("#"):
            continue
        body = line.lstrip()[1:]
        match = re.search(
            r"(?:[A-Z_]+=\S+ )*(?:docker compose run|docker-compose run|docker build|nox -s)", body
        )
        if match:
            command = body[match.start() :]
            if body[: match.start()].endswith("`"):  # quoted: the command ends at the closing backtick
                command = command.split("`")[0]
            found.append(command.strip())
    return found


def help_examples() -> list[str]:
    """The `ft ...` examples of `ft --help` and of every subcommand's --help."""
    examples = [line.strip() for line in MAIN_HELP.splitlines() if line.startswith("  ft ")]

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                    text = "\n".join(filter(None, [sub.description, sub.epilog]))
                    examples.extend(line.strip() for line in text.splitlines() if line.startswith("  ft "))
                    walk(sub)

    walk(build_parser())
    return examples


def nox_sessions() -> set[str]:
    """Names of noxfile.py's sessions (read with ast: nox need not be installed)."""
    names = set()
    for node in ast.parse((ROOT / "noxfile.py").read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef):
            for deco in node.decorator_list:
                call = deco if isinstance(deco, ast.Call) else None
                target = call.func if call else deco
                if isinstance(target, ast.Attribute) and target.attr == "session":
                    name = next(
                        (k.value.value for k in (call.keywords if call else []) if k.arg == "name"), None
                    )
                    names.add(name or node.name)
    return names


# -- checking one command -----------------------------------------------------------------------------
def parse_ft(argv: list[str]) -> tuple[argparse.Namespace | None, str | None]:
    """(namespace, None) when the real parser accepts `ft ARGV`, else (None, what it said)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0:  # --help, --version
            return argparse.Namespace(func=True), None
        return None, err.getvalue().strip().splitlines()[-1]
    if getattr(args, "func", None) is None:
        return None, "incomplete command (prints the usage and exits 2)"
    return args, None


def check_ft(argv: list[str]) -> str | None:
    return parse_ft(argv)[1]


def _mounts(service: dict) -> dict[str, bool]:
    """Container folder relative to the working directory -> read-only, from the service's volumes."""
    workdir = PurePosixPath(service.get("working_dir", "/"))
    mounts = {}
    for volume in service.get("volumes", []):
        parts = volume.split(":")
        target = PurePosixPath(parts[1])
        if target.is_relative_to(workdir):
            mounts[str(target.relative_to(workdir))] = len(parts) > 2 and "ro" in parts[2].split(",")
    return mounts


def _paths(args: argparse.Namespace) -> list[tuple[str, bool]]:
    """(path, written) for every file argument of a parsed command."""
    found = []
    for dest, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if not isinstance(v, str):
                continue
            if dest in PATH_DESTS | WRITTEN_DESTS or (dest == "recipe" and v.endswith((".yaml", ".yml"))):
                found.append((v, dest in WRITTEN_DESTS))
    return found


def check_compose_run(tokens: list[str]) -> str | None:
    """`run [--rm] [-T] [-e K=V] SERVICE ARGS` as Compose runs it: the service's entrypoint + ARGS."""
    i = 0
    while i < len(tokens) and tokens[i].startswith("-"):
        i += 2 if tokens[i] in ("-e", "--env", "--name", "-u", "--user", "-w", "--workdir") else 1
    if i >= len(tokens):
        return "no service named"
    name, rest = tokens[i], tokens[i + 1 :]
    if name not in SERVICES:
        return f"compose.yaml has no service {name!r} (it has {', '.join(SERVICES)})"
    service = SERVICES[name]
    entrypoint = service.get("entrypoint") or []
    prefix = _entrypoint_ft_argv(entrypoint)
    if prefix is None:
        return f"service {name!r}: entrypoint {entrypoint} is not ft"
    argv = prefix + (rest or list(service.get("command") or []))
    args, problem = parse_ft(argv)
    if problem:
        return f"runs `{shlex.join(['ft', *argv])}`: {problem}"
    mounts = _mounts(service)
    for path, written in _paths(args):
        top = PurePosixPath(path).parts[0] if not PurePosixPath(path).is_absolute() else None
        if top not in mounts:
            return f"runs `{shlex.join(['ft', *argv])}`: {path} is not in a folder the service mounts ({', '.join(mounts)})"
        if written and mounts[top]:
            return f"runs `{shlex.join(['ft', *argv])}`: {path} is written, but {top}/ is mounted read-only"
    return None


def check_line(line: str, sessions: set[str]) -> str | None:
    """None when `line` is fine (or not a command at all), else what is wrong with it."""
    if " -> " in line:  # the README's picture of the loop: `ft COMMAND -> what it does`
        words = line.split(" -> ")[0].split()
        if words[:1] == ["ft"]:
            problem = check_ft([*words[1:], "--help"])
            return problem and f"no such command: {' '.join(words)}"
        return None
    line = re.sub(r"^(?:[A-Z_]+=(?:\$\([^)]*\)|\S+)\s+)+", "", line)  # leading VAR=value assignments
    problems = []
    for part in line.split("&&"):
        try:
            tokens = shlex.split(part.replace("[", "").replace("]", ""), comments=True)
        except ValueError as exc:
            return f"cannot split: {exc}"
        if not tokens:
            continue
        head = tokens[0]
        problem = None
        if head == "ft":
            problem = check_ft(tokens[1:])
        elif head == "docker-compose" or tokens[:2] == ["docker", "compose"]:
            sub = tokens[1:] if head == "docker-compose" else tokens[2:]
            while sub[:1] == ["-f"] or sub[:1] == ["-p"]:
                sub = sub[2:]
            if sub[:1] == ["run"]:
                problem = check_compose_run(sub[1:])
            elif sub[:1] not in (["config"], ["build"], ["down"], ["version"]):
                problem = f"unchecked compose command {sub[:1]}"
        elif head in ("torchrun", "accelerate") or tokens[:2] == ["docker", "run"]:
            argv = ft_module_argv(tokens)
            problem = check_ft(argv) if argv is not None else f"`{head}` line that does not run `-m ft`"
        elif head == "docker":
            if tokens[1:2] == ["build"]:
                flavours = {a.split("=", 1)[1] for a in tokens if a.startswith("FLAVOUR=")}
                problem = next(
                    (
                        f"no lockfiles/{f}.txt"
                        for f in flavours
                        if not (ROOT / "lockfiles" / f"{f}.txt").is_file()
                    ),
                    None,
                )
            elif tokens[1:3] != ["image", "inspect"]:
                problem = f"unchecked docker command {tokens[1:2]}"
        elif head == "nox":
            named = [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t in ("-s", "--session")]
            missing = [n for n in named if n not in sessions]
            problem = missing and f"noxfile.py has no session {', '.join(missing)}"
        elif head == "pip":
            locked = re.search(r"^torch==(\S+)", (ROOT / "lockfiles" / "cpu.txt").read_text(), re.M).group(1)
            pins = [t.split("==", 1)[1] for t in tokens if t.startswith("torch==")]
            problem = next((f"torch=={p}, but the CPU lock pins {locked}" for p in pins if p != locked), None)
        elif head not in UNCHECKED:
            continue  # not a command: a file tree or a picture
        if problem:
            problems.append(problem)
    return "; ".join(problems) or None


def _collect(lines: list[str], where: str) -> list[tuple[str, str]]:
    return [(where, line) for line in lines]


DOCUMENTED = (
    _collect(code_lines((ROOT / "README.md").read_text(encoding="utf-8")), "README.md")
    + _collect(code_lines((ROOT / "env" / "README.md").read_text(encoding="utf-8")), "env/README.md")
    + _collect(comment_commands((ROOT / "compose.yaml").read_text(encoding="utf-8")), "compose.yaml")
    + _collect(comment_commands((ROOT / "Dockerfile").read_text(encoding="utf-8")), "Dockerfile")
    + _collect(help_examples(), "--help")
)


@pytest.mark.parametrize(("where", "line"), DOCUMENTED, ids=[f"{w}: {c}"[:90] for w, c in DOCUMENTED])
def test_documented_command_works(where, line):
    problem = check_line(line, nox_sessions())
    assert problem is None, f"{where}: `{line}`: {problem}"


def test_the_documents_were_read():
    """Guards the extraction: each source yields the commands it is known to hold."""
    lines = {c for _, c in DOCUMENTED}
    assert any(c.startswith("docker compose run --rm train") for c in lines)
    assert any(c.startswith("pip install nox uv") for c in lines)
    assert any(c.startswith("docker compose run --rm verify") for c in lines)
    assert sum(w == "--help" for w, _ in DOCUMENTED) >= 10
    assert {"tests", "smoke", "image_smoke", "lock"} <= nox_sessions()


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("docker compose run --rm train ft reproduce X.tar.gz", "unrecognized arguments"),  # the known bug
        ("docker compose run --rm trian", "no service 'trian'"),
        ("docker compose run --rm verify NAME.tar.gz", "not in a folder the service mounts"),
        ("docker compose run --rm ft reproduce bundles/X.tar.gz --work data/x", "read-only"),
        ("ft verfiy bundles/x.tar.gz", "invalid choice"),
        ("ft data", "incomplete command"),
        ("nox -s smok", "no session smok"),
        ("pip install -e . torch==2.0.0+cpu", "the CPU lock pins"),
    ],
)
def test_the_checker_catches(line, says):
    problem = check_line(line, nox_sessions())
    assert problem and says in problem, problem


# -- the README inside a bundle -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle_readme(tmp_path_factory):
    """A signed bundle (fabricated run, real `ft package`) and the commands its README prints."""
    from test_bundle import make_run

    from ft.bundle import package, signing

    root = tmp_path_factory.mktemp("commands")
    signing.generate_keypair(root / "ft.key", root / "PUBLIC.pem")
    bundle_dir = package(make_run(root), root / "bundles", sign_key=root / "ft.key")
    readme = (bundle_dir / "README.md").read_text(encoding="utf-8")
    return bundle_dir, code_lines(readme)


def test_bundle_readme_commands_parse(bundle_readme):
    _, lines = bundle_readme
    assert any(line.startswith("ft reproduce") for line in lines)
    assert any("docker compose run" in line for line in lines)
    problems = [f"`{line}`: {p}" for line in lines if (p := check_line(line, nox_sessions()))]
    assert not problems, "bundle README: " + "; ".join(problems)


def test_bundle_readme_verify_commands_run(bundle_readme, monkeypatch, capsys):
    """Run as written, from the folder that holds the archive (where the receiver has it)."""
    from ft.cli import main

    bundle_dir, lines = bundle_readme
    monkeypatch.chdir(bundle_dir.parent)
    (bundle_dir.parent / "PUBLIC.pem").write_bytes((bundle_dir.parent.parent / "PUBLIC.pem").read_bytes())
    verify = [shlex.split(line, comments=True) for line in lines if line.startswith("ft verify")]
    assert verify
    for argv in verify:
        assert main(argv[1:]) == 0, capsys.readouterr().err


# -- compose.yaml's services --------------------------------------------------------------------------
def test_smoke_service_uses_the_cpu_image_and_no_gpu():
    """`docker compose run --rm smoke` must not build the 6.6 GB CUDA image nor ask for a GPU."""
    smoke = SERVICES["smoke"]
    assert smoke["image"] == "ft:cpu"
    assert smoke["build"]["args"]["FLAVOUR"] == "cpu"
    assert "deploy" not in smoke
    assert smoke.get("network_mode") == "none"
