"""`ft launch`: a recipe or a sealed bundle onto N machines of M GPUs each, as a SkyPilot task.

ft writes the task; SkyPilot gets the machines and torchrun starts the processes (ft launches nothing of
its own). The task:

- runs the pinned image, by digest only (`resources.image_id: docker:REF@sha256:...`): a tag can move,
  a digest cannot, and the environment manifest of every node must name the same image;
- syncs a launch directory as `workdir`: the fully resolved recipe (`recipe.yaml`), with every local file
  it names (data, eval schema, a local model directory) replaced by where `file_mounts` puts it on each
  node (`~/ft-files/...`); built-in files (`builtin:`) and Hub ids are left alone, the image has them;
- runs torchrun on every node from SkyPilot's node variables: SKYPILOT_NUM_NODES,
  SKYPILOT_NUM_GPUS_PER_NODE, SKYPILOT_NODE_RANK, and the first of SKYPILOT_NODE_IPS as the rendezvous
  address; each process runs `python -m ft run` (or `ft reproduce` for a bundle);
- brings the bundle back by `rsync` from the head node (printed by `ft launch`): only rank 0, on node 0,
  writes runs and bundles, so the head node holds the one bundle. Plain rsync needs no bucket and no
  storage credentials beyond the cluster's, and works on every cloud SkyPilot supports; it must run
  before `sky down`, which deletes the machines.

SkyPilot itself is optional (`pip install ft[launch]`): writing the task needs only PyYAML; `--up` hands
it to SkyPilot's Python API (sky.launch). SkyPilot 0.14 pins click below 8.2 while the hub client in
ft's lock needs click >= 8.4.2, so in ft's locked environment SkyPilot is better kept in its own
environment (`uv tool install skypilot` / `pipx install skypilot`) and the written task launched with
`sky launch -c NAME TASK.yaml`, which is what `ft launch` prints.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ft.errors import FtError

DIGEST_RE = re.compile(r"^[^\s@]+@sha256:[0-9a-f]{64}$")
GPUS_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)(?::([1-9][0-9]*))?$")
REMOTE_FILES = "~/ft-files"  # where file_mounts put local files on every node
RENDEZVOUS_PORT = 29500  # torchrun's default master port; FT_MASTER_PORT on the nodes overrides it
LOCAL_IMAGES = ("ft:cu130", "ft:cu128")  # what `python env/image.py build` tags, newest CUDA first


class _TaskDumper(yaml.SafeDumper):
    """Multi-line strings (the run script) as YAML literal blocks, readable as the shell script they are."""


_TaskDumper.add_representer(
    str,
    lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None),
)


@dataclass
class LaunchPlan:
    """What `ft launch` wrote, and how to start it and bring the bundle back."""

    task_path: Path
    workdir: Path
    config: dict[str, Any]
    cluster: str
    remote_out: str  # where the bundle (or the reproduction) lands on the head node
    mounts: dict[str, str] = field(default_factory=dict)

    def render(self) -> str:
        return "\n".join(
            [
                f"wrote {self.task_path} ({self.config['num_nodes']} node(s) x "
                f"{self.config['resources']['accelerators']}, image {self.config['resources']['image_id']})",
                f"start it:       sky launch -c {self.cluster} {self.task_path}",
                f"bundle back:    rsync -Pavz {self.cluster}:{self.remote_out}/ ./bundles/   (before `sky down`)",
                f"then:           sky down {self.cluster}",
            ]
        )


def check_image(ref: str | None) -> str:
    """The image reference pinned by digest: `ref` (which must carry one), else a local build's digest."""
    if ref:
        if not DIGEST_RE.match(ref):
            raise FtError(
                f"--image {ref}: not pinned by digest; pass REF@sha256:<64 hex> "
                "(`docker image inspect --format '{{index .RepoDigests 0}}' IMAGE` after pushing it)"
            )
        return ref
    found = local_image_digest()
    if found:
        return found
    raise FtError(
        "no image digest known here: push the image (python env/image.py build; docker push) and pass "
        "--image REGISTRY/ft@sha256:<64 hex>"
    )


def local_image_digest() -> str | None:
    """The registry digest of a locally built and pushed ft image (docker's RepoDigests), if any."""
    docker = shutil.which("docker")
    if not docker:
        return None
    for tag in LOCAL_IMAGES:
        try:
            out = subprocess.run(
                [docker, "image", "inspect", "--format", "{{json .RepoDigests}}", tag],
                capture_output=True,
                text=True,
                timeout=20,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode == 0:
            for ref in yaml.safe_load(out.stdout or "[]") or []:
                if DIGEST_RE.match(ref):
                    return ref
    return None


def parse_gpus(spec: str) -> tuple[str, int]:
    """`H100:8` -> ("H100", 8); `A100` -> ("A100", 1)."""
    m = GPUS_RE.match(spec.strip())
    if not m:
        raise FtError(f"--gpus {spec!r}: expected NAME:COUNT, e.g. H100:8")
    return m.group(1), int(m.group(2) or 1)


def is_bundle(target: str) -> bool:
    p = Path(target)
    return (p.is_file() and p.name.endswith((".tar.gz", ".tgz"))) or (p / "MANIFEST.json").is_file()


def run_command(ft_args: str) -> str:
    """The task's `run`: torchrun on this node from SkyPilot's variables, each process running
    `python -m ft FT_ARGS` (a shell-quoted string)."""
    return "\n".join(
        [
            "set -euo pipefail",
            'MASTER_ADDR=$(printf "%s\\n" "$SKYPILOT_NODE_IPS" | head -n1)',
            'torchrun --nnodes "$SKYPILOT_NUM_NODES" --nproc-per-node "$SKYPILOT_NUM_GPUS_PER_NODE" '
            f'--node-rank "$SKYPILOT_NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "${{FT_MASTER_PORT:-{RENDEZVOUS_PORT}}}" '
            f"-m ft {ft_args}",
            "",
        ]
    )


def _mount(value: str, what: str, mounts: dict[str, str], *, directory: bool = False) -> str:
    """A recipe's file setting: a local path becomes its place on the nodes; builtin:/Hub stay as they are."""
    if value.startswith("builtin:"):
        return value
    p = Path(value).expanduser()
    if p.is_dir() if directory else p.is_file():
        remote = f"{REMOTE_FILES}/{len(mounts)}-{p.name}"
        mounts[remote] = str(p.resolve())
        return remote
    if directory or ":" in value:  # a Hub id or another scheme: the nodes resolve it themselves
        return value
    raise FtError(f"{what}: {value}: no such file here to send to the nodes")


def _recipe_for_nodes(settings, mounts: dict[str, str]) -> dict[str, Any]:
    cfg = settings.to_dict()
    cfg["data"]["train"] = [_mount(v, "data.train", mounts) for v in cfg["data"]["train"]]
    cfg["data"]["eval"] = [_mount(v, "data.eval", mounts) for v in cfg["data"].get("eval") or []]
    schema = cfg.get("eval", {}).get("json_schema")
    if schema:
        cfg["eval"]["json_schema"] = _mount(schema, "eval.json_schema", mounts)
    cfg["model"]["name_or_path"] = _mount(
        cfg["model"]["name_or_path"], "model.name_or_path", mounts, directory=True
    )
    return cfg


def plan(
    target: str,
    *,
    nodes: int,
    gpus: str,
    out_dir: Path | None = None,
    image: str | None = None,
    cloud: str | None = None,
    overrides: list[str] | None = None,
    cluster: str | None = None,
) -> LaunchPlan:
    """Write the SkyPilot task for `target` (a recipe name/YAML, or a bundle) into out_dir/task.yaml
    (default: launch/CLUSTER/), its workdir beside it."""
    if nodes < 1:
        raise FtError(f"--nodes {nodes}: must be at least 1")
    accel, per_node = parse_gpus(gpus)
    ref = check_image(image)
    mounts: dict[str, str] = {}
    if is_bundle(target):
        if overrides:
            raise FtError("--set does not apply to a bundle: a bundle re-runs its own sealed recipe")
        src = Path(target)
        remote = f"{REMOTE_FILES}/bundle/{src.name}"
        mounts[remote] = str(src.resolve())
        name = src.name.removesuffix(".tar.gz").removesuffix(".tgz")
        # "$HOME", not "~": the path is quoted for the shell, and ~ does not expand inside quotes
        here = '"$HOME' + remote.removeprefix("~") + '"'
        ft_args, outdir = f"reproduce {here} --work reproduce", "~/sky_workdir/reproduce"
        recipe_text = None
    else:
        from ft.config import load_settings

        settings = load_settings(target, overrides or [])
        recipe = _recipe_for_nodes(settings, mounts)
        name = settings.name
        bundles = str(settings.output.bundle_dir)
        outdir = bundles if bundles.startswith(("/", "~")) else f"~/sky_workdir/{bundles}"
        ft_args = "run --recipe recipe.yaml"
        header = f"# ft launch: {target} resolved for the nodes (local files replaced by their mounts)\n"
        recipe_text = header + yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True, width=100)
    cluster = cluster or re.sub(r"[^a-z0-9-]", "-", f"ft-{name}".lower())[:40].strip("-")
    out_dir = out_dir or Path("launch") / cluster
    workdir = out_dir / "workdir"
    resources: dict[str, Any] = {"accelerators": f"{accel}:{per_node}", "image_id": f"docker:{ref}"}
    if cloud:
        resources["cloud"] = cloud
    config: dict[str, Any] = {
        "name": cluster,
        "num_nodes": nodes,
        "resources": resources,
        "workdir": str(workdir.resolve()),
        "envs": {"FT_IMAGE_ID": ref},  # the environment manifest records the image each node ran
        "run": run_command(ft_args),
    }
    if mounts:
        config["file_mounts"] = dict(mounts)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    if recipe_text is not None:
        (workdir / "recipe.yaml").write_text(recipe_text, encoding="utf-8")
    else:
        (workdir / "README.txt").write_text(
            f"ft launch of bundle {Path(target).name}: reproduced from {REMOTE_FILES}/bundle/\n",
            encoding="utf-8",
        )
    task_path = out_dir / "task.yaml"
    tmp = task_path.with_suffix(".yaml.tmp")
    tmp.write_text(
        "# SkyPilot task written by `ft launch`; start it with `sky launch -c NAME THIS_FILE`\n"
        + yaml.dump(config, Dumper=_TaskDumper, sort_keys=False, width=100),
        encoding="utf-8",
    )
    tmp.replace(task_path)
    return LaunchPlan(task_path, workdir, config, cluster, outdir, mounts)


def up(p: LaunchPlan) -> Any:
    """Hand the task to SkyPilot (sky.launch) and stream its logs until the job ends."""
    try:
        import sky
    except ImportError:
        raise FtError(
            f"ft launch --up needs SkyPilot: pip install ft[launch] (or run `sky launch -c {p.cluster} "
            f"{p.task_path}` from SkyPilot's own environment)"
        ) from None
    task = sky.Task.from_yaml(str(p.task_path))
    return sky.stream_and_get(sky.launch(task, cluster_name=p.cluster))
