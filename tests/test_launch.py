"""ft launch: the SkyPilot task it writes, checked by SkyPilot's own parser offline, and its run command
executed here as SkyPilot would on one node with 2 "GPUs" (CPU processes under torchrun, gloo)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ft import launch
from ft.cli import main
from ft.errors import FtError

DIGEST = "ghcr.io/example/ft@sha256:" + "ab" * 32

# Run in SkyPilot's interpreter with HOME in a temporary directory (importing sky writes ~/.sky) and
# every socket refused, so a network call fails the test. Task.validate() as a whole is not offline:
# its resource check downloads SkyPilot's accelerator catalogue; the parts below are.
VALIDATE = r"""
import json, socket, sys
def refuse(*a, **k):
    raise OSError("network disabled by the test")
socket.socket.connect = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
import sky
task = sky.Task.from_yaml(sys.argv[1])
task.validate_name()
task.validate_run()
task.expand_and_validate_workdir()
task.expand_and_validate_file_mounts()
(res,) = task.resources
print(json.dumps({
    "num_nodes": task.num_nodes,
    "accelerators": res.accelerators,
    "image_id": res.image_id,
    "cloud": str(res.cloud) if res.cloud else None,
    "file_mounts": task.file_mounts,
    "workdir": task.workdir,
    "run": task.run,
}))
"""


def _sky_python() -> str:
    """An interpreter that has SkyPilot: FT_TEST_SKY_PYTHON (SkyPilot kept in its own environment, see
    ft/launch.py), else this one if it has SkyPilot; else the test skips."""
    other = os.environ.get("FT_TEST_SKY_PYTHON")
    if other:
        return other
    if importlib.util.find_spec("sky") is None:
        pytest.skip("SkyPilot not installed (pip install ft[launch], or set FT_TEST_SKY_PYTHON)")
    return sys.executable


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    src = Path(__file__).resolve().parents[1] / "ft" / "recipes" / "data" / "tickets.jsonl"
    dst = tmp_path / "my-data" / "train.jsonl"
    dst.parent.mkdir()
    shutil.copy(src, dst)
    return dst


def _plan(tmp_path: Path, data_file: Path, **kw) -> launch.LaunchPlan:
    args = {"nodes": 2, "gpus": "H100:8", "image": DIGEST, "out_dir": tmp_path / "launch"} | kw
    return launch.plan("tiny", overrides=[f"data.train={json.dumps([str(data_file)])}"], **args)


def test_task_validates_with_skypilot_offline(tmp_path, data_file):
    python = _sky_python()
    p = _plan(tmp_path, data_file, cloud="gcp")
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    out = subprocess.run(
        [python, "-c", VALIDATE, str(p.task_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    task = json.loads(out.stdout.strip().splitlines()[-1])
    assert task["num_nodes"] == 2
    assert task["accelerators"] == {"H100": 8}
    assert task["image_id"] == {"null": f"docker:{DIGEST}"}  # any region (JSON spells the None key null)
    assert task["cloud"].lower() == "gcp"
    assert task["file_mounts"] == {"~/ft-files/0-train.jsonl": str(data_file.resolve())}
    assert Path(task["workdir"]) == p.workdir.resolve()
    assert "torchrun" in task["run"] and "$SKYPILOT_NODE_RANK" in task["run"]


def test_recipe_points_at_the_mounts(tmp_path, data_file):
    p = _plan(tmp_path, data_file)
    recipe = yaml.safe_load((p.workdir / "recipe.yaml").read_text())
    assert recipe["data"]["train"] == ["~/ft-files/0-train.jsonl"]
    assert recipe["eval"]["json_schema"] == "builtin:tickets.schema.json"  # in the image: not mounted
    assert recipe["model"]["name_or_path"] == "builtin:tiny-qwen2"
    cfg = yaml.safe_load(p.task_path.read_text())
    assert cfg["resources"] == {"accelerators": "H100:8", "image_id": f"docker:{DIGEST}"}
    assert cfg["envs"]["FT_IMAGE_ID"] == DIGEST
    assert "rsync -Pavz ft-tiny:~/sky_workdir/bundles/" in p.render()


def _skypilot_env(home: Path, port: int) -> dict[str, str]:
    """What SkyPilot sets on the one node of a 1-node cluster with 2 accelerators."""
    return {
        **os.environ,
        "HOME": str(home),
        "SKYPILOT_NODE_RANK": "0",
        "SKYPILOT_NODE_IPS": "127.0.0.1",
        "SKYPILOT_NUM_NODES": "1",
        "SKYPILOT_NUM_GPUS_PER_NODE": "2",
        "FT_MASTER_PORT": str(port),
    }


def _as_skypilot_would(p: launch.LaunchPlan, home: Path) -> None:
    """Lay out the node as SkyPilot would: the file mounts copied to their places under HOME."""
    for remote, local in p.config.get("file_mounts", {}).items():
        dst = Path(remote.replace("~", str(home), 1))
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if Path(local).is_dir() else shutil.copy)(local, dst)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_command_starts_torchrun_from_skypilot_variables(tmp_path, data_file):
    p = _plan(tmp_path, data_file, nodes=1, gpus="cpu:2")
    fake = tmp_path / "bin"
    fake.mkdir()
    record = tmp_path / "argv.json"
    (fake / "torchrun").write_text(
        f'#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, "w"))\n'
    )
    (fake / "torchrun").chmod(0o755)
    env = _skypilot_env(tmp_path / "home", 12345)
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    subprocess.run(["bash", "-c", p.config["run"]], cwd=p.workdir, env=env, check=True, timeout=60)
    assert json.loads(record.read_text()) == [
        *("--nnodes", "1", "--nproc-per-node", "2", "--node-rank", "0"),
        *("--master-addr", "127.0.0.1", "--master-port", "12345"),
        *("-m", "ft", "run", "--recipe", "recipe.yaml"),
    ]


@pytest.mark.slow  # ~60-90 s on 2 shared cores: two ranks train, evaluate and package the tiny model
def test_run_command_trains_two_cpu_processes_end_to_end(tmp_path, data_file, tiny_model_dir):
    """The task's run script, executed here: torchrun starts 2 CPU ranks of `ft run`; one bundle.

    tiny_model_dir: the tiny model is built before the ranks start (FT_CACHE passes through), as the
    image has its models before the task runs."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    p = launch.plan(
        "tiny",
        nodes=1,
        gpus="cpu:2",
        image=DIGEST,
        out_dir=tmp_path / "launch",
        overrides=[
            f"data.train={json.dumps([str(data_file)])}",
            "train.max_steps=2",
            "train.effective_batch=4",
            "train.micro_batch=2",
            "eval.max_new_tokens=8",
            "data.eval_max_rows=8",
        ],
    )
    home = tmp_path / "home"
    _as_skypilot_would(p, home)
    out = subprocess.run(
        ["bash", "-c", p.config["run"]],
        cwd=p.workdir,
        env=_skypilot_env(home, _free_port()),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert len(list((p.workdir / "bundles").glob("*.tar.gz"))) == 1


def test_bundle_target_runs_reproduce(tmp_path):
    bundle = tmp_path / "tiny-20260101-000000-abcd.tar.gz"
    bundle.write_bytes(b"not checked here: ft reproduce verifies it on the node")
    p = launch.plan(str(bundle), nodes=2, gpus="A100:4", image=DIGEST, out_dir=tmp_path / "l")
    assert p.config["file_mounts"] == {f"~/ft-files/bundle/{bundle.name}": str(bundle)}
    assert f'-m ft reproduce "$HOME/ft-files/bundle/{bundle.name}" --work reproduce' in p.config["run"]
    assert p.config["num_nodes"] == 2 and p.config["resources"]["accelerators"] == "A100:4"
    with pytest.raises(FtError, match="does not apply to a bundle"):
        launch.plan(str(bundle), nodes=1, gpus="A100:4", image=DIGEST, overrides=["lora.r=8"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["tiny", "--gpus", "H100:8", "--image", "ghcr.io/example/ft:cu130"], "not pinned by digest"),
        (["no-such-recipe", "--gpus", "H100:8", "--image", DIGEST], "no-such-recipe"),
        (["tiny", "--gpus", "H100:x", "--image", DIGEST], "NAME:COUNT"),
        (["tiny", "--gpus", "H100:8", "--image", DIGEST, "--set", "data.train=['gone.jsonl']"], "gone.jsonl"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(["launch", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "launch").exists() or not list((tmp_path / "launch").rglob("task.yaml"))


def test_no_digest_known_needs_image(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launch, "local_image_digest", lambda: None)
    assert main(["launch", "tiny", "--gpus", "H100:8"]) == 2
    assert "--image REGISTRY/ft@sha256:" in capsys.readouterr().err


def test_up_without_skypilot_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "sky", None)  # import sky -> ImportError, as when not installed
    assert main(["launch", "tiny", "--gpus", "H100:8", "--image", DIGEST, "--up"]) == 2
    err = capsys.readouterr().err
    assert "pip install ft[launch]" in err and len(err.strip().splitlines()) == 1


def test_up_hands_the_task_to_skypilot(tmp_path, monkeypatch, capsys):
    """--up: sky.Task.from_yaml(path) -> sky.launch(task, cluster_name=...) -> sky.stream_and_get(request id),
    SkyPilot 0.14's client API (a fake here: no cloud)."""
    import types

    calls = []

    class Task:
        @staticmethod
        def from_yaml(path):
            calls.append(("from_yaml", path))
            return "TASK"

    def launch_(task, cluster_name=None, **kw):
        calls.append(("launch", task, cluster_name))
        return "REQUEST"

    def stream_and_get(request_id=None, **kw):
        calls.append(("stream_and_get", request_id))
        return (1, None)

    monkeypatch.setitem(
        sys.modules, "sky", types.SimpleNamespace(Task=Task, launch=launch_, stream_and_get=stream_and_get)
    )
    monkeypatch.chdir(tmp_path)
    assert main(["launch", "tiny", "--gpus", "H100:8", "--image", DIGEST, "--cluster", "c1", "--up"]) == 0
    assert calls == [
        ("from_yaml", str(Path("launch/c1/task.yaml"))),
        ("launch", "TASK", "c1"),
        ("stream_and_get", "REQUEST"),
    ]
    assert "rsync -Pavz c1:~/sky_workdir/bundles/" in capsys.readouterr().out


def test_digest_of_a_pushed_local_build_is_used(tmp_path, monkeypatch):
    """No --image: the RepoDigests docker records for a pushed `ft:cu130` (a fake docker CLI here)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "docker").write_text(
        f'#!{sys.executable}\nimport sys\nif sys.argv[-1] == "ft:cu130":\n    print(\'["{DIGEST}"]\')\n'
        "else:\n    sys.exit(1)\n"
    )
    (fake / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    assert launch.local_image_digest() == DIGEST
    p = launch.plan("tiny", nodes=1, gpus="L4:1", out_dir=tmp_path / "l")
    assert p.config["resources"]["image_id"] == f"docker:{DIGEST}"
