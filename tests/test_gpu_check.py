"""benchmarks/gpu_check.py, the one offline GPU check, on CPU: its help documents the offline run; without
CUDA it writes its two files and says what it skipped and why; each part survives another's failure. The
GPU flow itself runs with its subprocesses faked at bench_gpu.call's signature (what a GPU box would
answer), so the first real GPU session does not find the script's own bugs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gpu  # noqa: E402
import gpu_check  # noqa: E402

from ft.sizing.gpus import GIB  # noqa: E402

H100 = {
    "cuda_available": True,
    "torch": "2.11.0+cu130",
    "cuda_build": "13.0",
    "driver": "580.95.05",
    "name": "NVIDIA H100 80GB HBM3",
    "memory_bytes": 80 * GIB,
    "devices": [{"name": "NVIDIA H100 80GB HBM3", "memory_bytes": 80 * GIB, "capability": "9.0"}],
}


def _files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


def test_help_documents_the_offline_run(capsys):
    with pytest.raises(SystemExit) as done:
        gpu_check.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "../shared/gpu/make-site.sh .gpusite pytest==9.2.0" in text and "matplotlib==" in text
    assert gpu_check.PREAMBLE + " && python3 benchmarks/gpu_check.py" in text
    assert "tar xzf .gpusite/site.tgz" in text and "PYTHONPATH=/tmp/site:$PWD" in text
    assert '[".gpusite"]' in text and "$OUT/gpu-check.json" in text


def test_without_cuda_it_writes_both_files_says_what_it_skipped_and_survives_a_failing_part(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(
        gpu_check, "probe_device", lambda env: {"cuda_available": False, "torch": "2.13.0+cpu"}
    )
    out = tmp_path / "out"
    rc = gpu_check.main(["--out", str(out), "--work", str(tmp_path / "w"), "--inject-failure", "size"])
    assert rc == 1  # the injected failure is an error
    assert _files(out) == ["gpu-check.json", "gpu-check.md"]
    report = json.loads((out / "gpu-check.json").read_text())
    md = (out / "gpu-check.md").read_text()
    parts = report["parts"]
    for name in ("tests", "run", "bench"):
        assert parts[name]["status"] == "skipped" and "needs a CUDA GPU" in parts[name]["reason"]
    assert {s["what"] for s in report["skipped"]} >= {"part tests", "part run", "part bench"}
    assert "## Skipped, and why" in md and "needs a CUDA GPU: no CUDA device" in md
    assert "--cpu-rehearsal" in md  # says how to run part (b)'s flow without a GPU
    # the failing part is recorded with its traceback; the others still report what they could
    assert parts["size"]["status"] == "error" and "injected failure" in parts["size"]["error"]
    assert "Traceback" in parts["size"]["traceback"] and "injected failure" in md
    assert [r["path"] for r in parts["bench"]["predicted"]] == ["ft-unsloth", "ft-hf", "bare-unsloth"]
    assert "predicted peak GiB" in md and report["measured"] is False
    assert report["device"]["cuda_available"] is False and report["environment"]["versions"]["torch"]
    assert "no GPU figure measured" in md.splitlines()[0]
    assert str(ROOT) not in md and str(tmp_path / "w") not in md


class FakeGpuBox:
    """What the subprocesses of gpu_check answer on a GPU box, at bench_gpu.call's signature. The Unsloth
    `ft run` crashes, one sweep point fails, and one GPU test fails: the check must report all three and
    every other result."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, cmd, *, timeout, env, cwd=None, log=None):
        self.calls.append(cmd)

        def write(text: str) -> None:
            if log:
                with open(log, "a") as f:
                    f.write(text)

        if "--build-model" in cmd:
            model_dir = Path(cmd[cmd.index("--model-dir") + 1])
            model_dir.mkdir(parents=True, exist_ok=True)
            (model_dir / ".complete").write_text("fake")
            return 0
        if "--worker" in cmd:
            spec = json.loads(cmd[cmd.index("--worker") + 1])
            result = Path(cmd[cmd.index("--result") + 1])
            if spec["id"] == "sweep-ft-hf-qwen2.5-0.5b-4x512":
                record = {
                    "spec": spec,
                    "error": "RuntimeError: boom",
                    "oom": False,
                    "traceback": "Traceback: boom",
                }
            else:
                peak = bench_gpu.predict(spec, 80 * GIB).peak_allocated_bytes / 1.05
                tps = {"ft-unsloth": 4000.0, "ft-hf": 2000.0, "bare-unsloth": 4050.0}[
                    f"{spec['kind']}-{spec['backend']}"
                ]
                record = {
                    "spec": spec,
                    "peak_allocated_bytes": int(peak),
                    "tokens_per_s": tps,
                    "device": H100["name"],
                    "device_memory_bytes": H100["memory_bytes"],
                    "started": "2026-12-01T00:00:00+00:00",
                    "versions": {"torch": "2.11.0"},
                }
            result.write_text(json.dumps(record))
            return 0
        if cmd[1:3] == ["-m", "pytest"]:
            xml = Path(next(a for a in cmd if a.startswith("--junitxml=")).split("=", 1)[1])
            name = Path(cmd[5]).stem
            xml.write_text(
                f'<testsuites><testsuite name="pytest"><testcase classname="tests.gpu.{name}" name="test_a[hf]" '
                f'time="12.5"/><testcase classname="tests.gpu.{name}" name="test_a[unsloth]" time="20.0">'
                '<failure message="AssertionError: qkv">Traceback\nassert 0 == 2</failure></testcase>'
                "</testsuite></testsuites>"
            )
            return 1
        if cmd[1:4] == ["-m", "ft", "run"]:
            recipe = json.loads((Path(cwd) / "recipe.yaml").read_text())
            backend = recipe["train"]["backend"]
            assert (
                recipe["model"]["name_or_path"].endswith("qwen2.5-0.5b")
                and recipe["train"]["max_steps"] == 30
            )
            if backend == "unsloth":
                write("Traceback (most recent call last):\nRuntimeError: Unsloth exploded\n")
                return 1
            run = Path(cwd) / "runs" / backend
            run.mkdir(parents=True)
            info = {"quantization": "nf4", "dtype": "bfloat16"}
            meta = {
                "status": "complete",
                "backend": backend,
                "verdict": "DISCARD",
                "train": {"steps": 30, "info": info},
            }
            (run / "run.json").write_text(json.dumps(meta))
            (Path(cwd) / "bundles").mkdir()
            (Path(cwd) / "bundles" / "gpu-check-hf.tar.gz").write_bytes(b"")
            return 0
        if cmd[1:4] == ["-m", "ft", "verify"]:
            return 0
        raise AssertionError(f"unexpected command {cmd}")


def _fake_gpu(monkeypatch) -> FakeGpuBox:
    box = FakeGpuBox()
    monkeypatch.setattr(gpu_check, "probe_device", lambda env: dict(H100))
    monkeypatch.setattr(gpu_check, "missing", lambda modules: [])
    monkeypatch.setattr(bench_gpu, "call", box)
    return box


def test_gpu_flow_reports_every_part_and_survives_failing_jobs(tmp_path, monkeypatch):
    box = _fake_gpu(monkeypatch)
    out = tmp_path / "out"
    rc = gpu_check.main(["--out", str(out), "--work", str(tmp_path / "w")])
    assert rc == 1 and _files(out) == ["gpu-check.json", "gpu-check.md"]
    report = json.loads((out / "gpu-check.json").read_text())
    md = (out / "gpu-check.md").read_text()
    parts, jobs = report["parts"], {j["id"]: j for j in report["jobs"]}
    assert report["skipped"] == [] and report["measured"] is True

    # every model is built once, before what needs it
    builds = [c[c.index("--build-model") + 1] for c in box.calls if "--build-model" in c]
    assert sorted(builds) == ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"]
    # (a) per-test outcomes from the JUnit XML, a failure with its message
    assert parts["tests"]["status"] == "failed" and parts["tests"]["counts"] == {"failed": 2, "passed": 2}
    assert "AssertionError: qkv" in md
    # (b) the Unsloth crash is recorded with its log tail; the hf run went on to `ft verify`
    assert jobs["run-unsloth"]["status"] == "failed" and "Unsloth exploded" in jobs["run-unsloth"]["log_tail"]
    assert (
        jobs["run-hf"]["status"] == "ok"
        and jobs["run-hf"]["verify_exit"] == 0
        and jobs["run-hf"]["steps"] == 30
    )
    # (c) the three timed runs ran alone, after everything that shares the GPU
    timed = [j for j in report["jobs"] if j["part"] == "bench"]
    assert all(j["status"] == "ok" and j["sharing_gpu_with"] == 0 for j in timed)
    shared_ends = [j["started_s"] + j["duration_s"] for j in report["jobs"] if j["part"] != "bench"]
    assert min(j["started_s"] for j in timed) >= max(shared_ends)
    assert "**2.00×** tokens/s" in md and "ft's overhead over a bare Unsloth loop" in md
    assert set(parts["bench"]["eta"]["measured"]) == {"unsloth", "hf"}
    # (d) predicted beside measured, the 7B points from (c) included; the failed point says so
    rows = {(r["model"], r["micro_batch"], r["seq_len"], r["backend"]): r for r in parts["size"]["rows"]}
    assert rows[("qwen2.5-7b", 2, 2048, "unsloth")]["error"] == pytest.approx(0.05, abs=1e-3)
    assert rows[("qwen2.5-0.5b", 4, 512, "hf")]["measured_peak_gib"] is None
    assert jobs["sweep-ft-hf-qwen2.5-0.5b-4x512"]["status"] == "failed"
    assert "Largest |error|: 5.0%" in md
    assert {e["what"] for e in report["errors"]} == {
        "run-unsloth",
        "sweep-ft-hf-qwen2.5-0.5b-4x512",
        "tests-test_gpu_training",
        "tests-test_gpu_probe",
    }


def test_a_budget_too_small_skips_jobs_with_the_reason(tmp_path, monkeypatch):
    _fake_gpu(monkeypatch)
    out = tmp_path / "out"
    argv = ["--out", str(out), "--work", str(tmp_path / "w"), "--parts", "size", "--budget", "35"]
    assert gpu_check.main(argv) == 0  # not running for lack of time is not a failure, and is said
    report = json.loads((out / "gpu-check.json").read_text())
    jobs = {j["id"]: j for j in report["jobs"]}
    assert jobs["model-qwen2.5-0.5b"]["status"] == "ok"  # 20 s guessed: fits in 35 - 10
    assert jobs["model-qwen2.5-1.5b"]["reason"] == "time budget: needs about 30 s, 25 s left"
    assert jobs["sweep-ft-hf-qwen2.5-0.5b-4x512"]["reason"].startswith("time budget: needs about 35 s")
    assert jobs["sweep-ft-hf-qwen2.5-1.5b-4x2048"]["reason"] == "needs model-qwen2.5-1.5b, which was skipped"
    md = (out / "gpu-check.md").read_text()
    assert "time budget: needs about 30 s" in md and "which was skipped" in md


@pytest.mark.slow
def test_cpu_rehearsal_runs_ft_run_and_ft_verify_on_the_tiny_model(tmp_path):
    out = tmp_path / "out"
    argv = ["--out", str(out), "--work", str(tmp_path / "w"), "--parts", "run", "--cpu-rehearsal"]
    gpu_check.main(argv)
    report = json.loads((out / "gpu-check.json").read_text())
    run = {j["id"]: j for j in report["jobs"]}["run-hf-cpu-rehearsal"]
    assert run["status"] == "ok", run
    assert run["verify_exit"] == 0 and run["steps"] == 4 and run["device"] == "cpu"


@pytest.mark.slow  # imports torch in a child process (~10 s)
def test_the_device_probe_runs_here_and_says_there_is_no_cuda():
    facts = gpu_check.probe_device(bench_gpu.subprocess_env())
    assert "why" not in facts, facts  # the probe itself worked
    assert facts["cuda_available"] is False and facts["torch"].startswith("2.")


def test_the_docs_give_the_same_offline_commands_as_the_help():
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    assert f"../shared/gpu/make-site.sh .gpusite {gpu_check.MAKE_SITE_EXTRAS}\n" in docs
    assert f"{gpu_check.PREAMBLE} && python3 benchmarks/gpu_check.py\n" in docs


def test_a_job_past_its_time_is_killed_with_its_children(tmp_path):
    """bench_gpu.call: a worker's children hold GPU memory too, so the whole process group goes."""
    import os
    import time

    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time; p = subprocess.Popen(['sleep', '60']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    t = time.monotonic()
    rc = bench_gpu.call([sys.executable, "-c", code], timeout=2, env=dict(os.environ), log=tmp_path / "log")
    assert rc is None and time.monotonic() - t < 20
    child = int(pid_file.read_text())
    for _ in range(50):  # reaped by init shortly after the kill
        status = Path(f"/proc/{child}/status")
        if not status.exists() or "State:\tZ" in status.read_text():
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the worker's child survived the timeout")
