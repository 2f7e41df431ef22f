"""Atomic outputs on a full disk: each kind of write fails cleanly, through the real CLI.

A full disk is injected where every ft writer must pass: `os.fsync` of a file under a chosen path
raises ENOSPC (as it does on filesystems that allocate late, and at the worst moment: the bytes are
written, the rename is next). Covered: a checkpoint, the adapter, a metrics line, the eval report, the
bundle directory and the bundle archive. The adapter is also hit the way safetensors fails on a full
disk (its own error type, half a file written), and, when the tests run as root and may mount, a real
tmpfs fills up under a training run, so torch's and safetensors' native writers fail for real.

Each time: exit code 2, one `error:` line saying no space was left and where, the previous good state
intact (checkpoints, adapter, report or bundle byte for byte), no staging leftovers, and no
half-written checkpoint that `--resume auto` could mistake for a complete one.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from ft.cli import main
from ft.train import CHECKPOINT_MARKER, find_resume_point, list_checkpoints, read_marker

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to map fds to paths")

SHORT = ["--recipe", "tiny", "--set", "train.max_steps=6", "--set", "train.save_every=3"]
QUICK_EVAL = ["--set", "eval.max_examples=8", "--set", "eval.max_new_tokens=16"]
ENOSPC_LINE = "no space left on device while writing"


def disk_full_under(monkeypatch, fragment: str) -> None:
    """From now on, fsync of any file whose path contains `fragment` fails with ENOSPC."""
    real = os.fsync

    def fsync(fd: int) -> None:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if fragment in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def ft(capsys, *argv: str) -> tuple[int, str]:
    """Run the CLI in this process; (exit code, the one `error:` line or '')."""
    capsys.readouterr()
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) <= 1, errors
    return code, errors[0] if errors else ""


def tree(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `root` (hidden ones included)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def hidden(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in root.rglob(".*")]


def assert_whole_checkpoints(run: Path) -> list[str]:
    names = []
    for checkpoint in list_checkpoints(run):
        listed = read_marker(checkpoint)["files"]
        assert sorted(p.name for p in checkpoint.iterdir() if p.name != CHECKPOINT_MARKER) == listed
        names.append(checkpoint.name)
    return names


@pytest.fixture
def work(tmp_path, monkeypatch, tiny_model_dir) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- training outputs ------------------------------------------------------------------------------------
def test_full_disk_while_writing_a_checkpoint(work, monkeypatch, capsys):
    with monkeypatch.context() as m:
        disk_full_under(m, "/.staging-000006.partial/")
        code, line = ft(capsys, "train", *SHORT, "--set", "output.run_name=c")
    run = work / "runs" / "c"
    assert code == 2
    assert f"checkpoints/step-000006: {ENOSPC_LINE} the checkpoint" in line
    assert "the last complete checkpoint (step-000003) is intact" in line and "--resume auto" in line
    assert assert_whole_checkpoints(run) == ["step-000003"] and hidden(run) == []
    assert not (run / "adapter").exists()
    # With space again, the run goes on from the intact checkpoint.
    assert ft(capsys, "train", *SHORT, "--set", "output.run_name=c", "--resume", "auto") == (0, "")
    assert assert_whole_checkpoints(run) == ["step-000003", "step-000006"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and hidden(run) == []


def test_full_disk_while_writing_the_adapter(work, monkeypatch, capsys):
    run = work / "runs" / "a"
    with monkeypatch.context() as m:
        disk_full_under(m, "/.adapter.")
        code, line = ft(capsys, "train", *SHORT, "--set", "output.run_name=a")
    assert code == 2 and f"runs/a/adapter: {ENOSPC_LINE}" in line
    assert assert_whole_checkpoints(run) == ["step-000003", "step-000006"]
    assert not (run / "adapter").exists() and hidden(run) == []
    assert ft(capsys, "train", *SHORT, "--set", "output.run_name=a", "--resume", "auto") == (0, "")
    before = tree(run / "adapter")

    # Now the way safetensors itself fails on a full disk: half a file, then its own error type.
    import peft.peft_model
    from safetensors import SafetensorError

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as m:
        m.setattr(peft.peft_model, "safe_save_file", save_file)
        code, line = ft(capsys, "train", *SHORT, "--set", "output.run_name=a", "--resume", "auto")
    assert code == 2 and f"runs/a/adapter: {ENOSPC_LINE}; the previous version is intact" in line
    assert tree(run / "adapter") == before and hidden(run) == []


def test_full_disk_while_appending_metrics(work, monkeypatch, capsys):
    with monkeypatch.context() as m:
        disk_full_under(m, "/runs/m/metrics.jsonl")
        code, line = ft(capsys, "train", *SHORT, "--set", "output.run_name=m")
    assert code == 2 and f"runs/m/metrics.jsonl: {ENOSPC_LINE}" in line


def test_a_leftover_staging_directory_is_never_resumed(tmp_path):
    """Even with a marker inside (killed just before the rename), a staging directory is not a checkpoint."""
    root = tmp_path / "checkpoints"
    for name in ("step-000003", "step-000006", ".staging-000009.partial/checkpoint-9", "step-000012"):
        (root / name).mkdir(parents=True)
    for name in ("step-000003", "step-000006", ".staging-000009.partial/checkpoint-9"):
        (root / name / CHECKPOINT_MARKER).write_text('{"step": 0}')
    # step-000012 has no marker: renamed by hand, or by something that is not ft
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000006"]
    assert find_resume_point(tmp_path, "auto").name == "step-000006"


# -- report and bundle ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir) -> Path:
    """A short run trained, evaluated and sealed (bundles/good and bundles/good.tar.gz)."""
    work = tmp_path_factory.mktemp("finished")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        assert main(["run", *SHORT, *QUICK_EVAL, "--set", "output.run_name=good"]) == 0
    finally:
        os.chdir(cwd)
    return work


def test_full_disk_while_writing_the_report(finished, monkeypatch, capsys):
    monkeypatch.chdir(finished)
    run = finished / "runs" / "good"
    before = tree(run)
    with monkeypatch.context() as m:
        disk_full_under(m, "/runs/good/eval/.")
        code, line = ft(capsys, "eval", "runs/good")
    assert code == 2 and "runs/good/eval/" in line and ENOSPC_LINE in line
    assert tree(run) == before  # report.json, report.md, decision.md, run.json: all as they were


def test_full_disk_while_writing_the_bundle_directory(finished, monkeypatch, capsys):
    monkeypatch.chdir(finished)
    with monkeypatch.context() as m:
        disk_full_under(m, "/full/.good.")
        code, line = ft(capsys, "package", "runs/good", "--out", "full")
    assert code == 2 and f"full/good: {ENOSPC_LINE}" in line
    assert list((finished / "full").iterdir()) == []  # no bundle, no archive, no staging


def test_full_disk_while_writing_the_bundle_archive(finished, monkeypatch, capsys):
    monkeypatch.chdir(finished)
    with monkeypatch.context() as m:
        disk_full_under(m, "/half/.good.tar.gz.")
        code, line = ft(capsys, "package", "runs/good", "--out", "half")
    assert code == 2 and f"half/good.tar.gz: {ENOSPC_LINE}" in line
    # No archive, no temp file; the bundle directory and its identity sidecar were written before.
    assert sorted(p.name for p in (finished / "half").iterdir()) == ["good", "good.manifest.sha256"]
    assert ft(capsys, "verify", "half/good") == (0, "")  # the directory was sealed before the archive


# -- a real full disk ----------------------------------------------------------------------------------
def test_a_real_full_tmpfs_under_training(tmp_path, monkeypatch, capsys, tiny_model_dir):
    """torch.save and safetensors fail in native code on a full disk; ft must still say so and keep state."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    # A run directory (~0.1 MB) and two tiny checkpoints (~0.5 MB each) fit; a third does not.
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1400k", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        monkeypatch.chdir(tmp_path)
        # The start-up disk check would refuse this disk; here it fills up while training (as when
        # something else writes to it), which no check at start-up can rule out.
        monkeypatch.setattr("ft.sizing.preflight.gate", lambda *args, **kwargs: [], raising=False)
        args = ["train", *SHORT, "--set", "train.max_steps=12", "--set", f"output.dir={mnt}"]
        code, line = ft(capsys, *args, "--set", "output.run_name=t")
        run = mnt / "t"
        kept = assert_whole_checkpoints(run)
        assert code == 2 and f"{ENOSPC_LINE} the checkpoint" in line, line
        assert kept and f"the last complete checkpoint ({kept[-1]}) is intact" in line
        assert hidden(run) == [] and not (run / "adapter").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
