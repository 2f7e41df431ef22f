"""Compare a rerun with its sealed bundle: what differs in the environment, how far the metrics moved.

A rerun that gives different numbers is only useful if it also says why they might differ, so the
environment facts that most often change results (package versions, lockfile, image, GPU, driver,
CUDA) are set side by side with the sealed ones. Metrics pass when each tuned-model metric is within
the recipe's tolerance of the sealed value and the KEEP/DISCARD verdict is unchanged. This module only
compares; retraining is wired by the CLI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ft.bundle import open_bundle
from ft.errors import FtError

VERSIONED = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "unsloth")


@dataclass(frozen=True)
class EnvDiff:
    fact: str
    sealed: str | None
    current: str | None


@dataclass(frozen=True)
class MetricRow:
    metric: str
    sealed: float | None
    new: float | None
    diff: float | None  # |new - sealed|; None when either side has no number
    within: bool


@dataclass
class MetricComparison:
    rows: list[MetricRow]
    sealed_verdict: str | None
    new_verdict: str | None
    tolerance: float
    reasons: list[str] = field(default_factory=list)  # why it failed; empty when it passed

    @property
    def passed(self) -> bool:
        return not self.reasons


def _get(d: Any, *keys: str) -> Any:
    for key in keys:
        d = d.get(key) if isinstance(d, dict) else None
    return d


def env_facts(env: dict[str, Any]) -> dict[str, str | None]:
    """The facts worth comparing, flattened to strings, from an env.json (ft.manifest format)."""
    packages = env.get("packages") or {}
    devices = _get(env, "gpu", "devices") or []
    facts: dict[str, Any] = {"python": env.get("python"), "os": env.get("os")}
    for name in VERSIONED:
        facts[name] = packages.get(name) or (_get(env, "torch", "version") if name == "torch" else None)
    facts |= {
        "lockfile sha256": _get(env, "lockfile", "sha256"),
        "image id": _get(env, "image", "id"),
        "git commit": env.get("git_commit") or _get(env, "git", "commit"),
        "GPU": ", ".join(str(d.get("name")) for d in devices if isinstance(d, dict)) or None,
        "NVIDIA driver": _get(env, "gpu", "driver"),
        "CUDA runtime": _get(env, "gpu", "cuda_runtime") or _get(env, "torch", "cuda"),
        "cuDNN": _get(env, "gpu", "cudnn"),
    }
    return {k: (None if v is None else str(v)) for k, v in facts.items()}


def compare_env(sealed: dict[str, Any], current: dict[str, Any]) -> list[EnvDiff]:
    """The environment facts whose values differ between the sealed run and this machine."""
    old, new = env_facts(sealed), env_facts(current)
    return [EnvDiff(fact, old[fact], new[fact]) for fact in old if old[fact] != new[fact]]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def compare_metrics(
    sealed_report: dict[str, Any], new_report: dict[str, Any], tolerance: float
) -> MetricComparison:
    """Tuned-model metrics, sealed vs new: each must be within `tolerance` and the verdict unchanged."""
    old = _get(sealed_report, "metrics", "tuned") or {}
    new = _get(new_report, "metrics", "tuned") or {}
    cmp = MetricComparison(
        rows=[],
        sealed_verdict=_get(sealed_report, "decision", "verdict"),
        new_verdict=_get(new_report, "decision", "verdict"),
        tolerance=tolerance,
    )
    for metric in old:
        a, b = _number(old[metric]), _number(new.get(metric))
        if a is None and b is None and old[metric] == new.get(metric):
            cmp.rows.append(MetricRow(metric, None, None, None, True))  # both absent/NaN: nothing moved
            continue
        diff = abs(b - a) if a is not None and b is not None else None
        within = diff is not None and diff <= tolerance + 1e-12
        cmp.rows.append(MetricRow(metric, a, b, diff, within))
        if not within:
            shown = "missing" if diff is None else f"moved by {diff:.4f} > {tolerance}"
            cmp.reasons.append(f"{metric}: {shown}")
    if cmp.sealed_verdict != cmp.new_verdict:
        cmp.reasons.append(f"verdict changed: {cmp.sealed_verdict} -> {cmp.new_verdict}")
    return cmp


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value).replace("|", "\\|")


def render_reproduce(env_diffs: list[EnvDiff], comparison: MetricComparison) -> str:
    """Markdown-like side-by-side report: environment differences, then metrics, then PASS/FAIL."""
    lines = ["## Environment (sealed vs this machine)", ""]
    if env_diffs:
        lines += ["| fact | sealed | now |", "|---|---|---|"]
        lines += [f"| {d.fact} | {_cell(d.sealed)} | {_cell(d.current)} |" for d in env_diffs]
    else:
        lines.append(
            "No differences in the compared facts (versions, lockfile, image, git, GPU, driver, CUDA)."
        )
    c = comparison
    lines += ["", f"## Tuned-model metrics (tolerance {c.tolerance})", ""]
    lines += ["| metric | sealed | new | difference | within |", "|---|---:|---:|---:|:---:|"]
    for r in c.rows:
        lines.append(
            f"| {r.metric} | {_cell(r.sealed)} | {_cell(r.new)} | {_cell(r.diff)} | {'yes' if r.within else 'NO'} |"
        )
    same = "yes" if c.sealed_verdict == c.new_verdict else "NO"
    lines.append(f"| verdict | {_cell(c.sealed_verdict)} | {_cell(c.new_verdict)} | | {same} |")
    lines += [
        "",
        "**PASS**: the rerun matches the sealed run." if c.passed else "**FAIL**: " + "; ".join(c.reasons),
    ]
    return "\n".join(lines) + "\n"


def load_bundle(
    path: Path, work_dir: Path | None = None, *, key: Path | None = None
) -> tuple[Path, dict[str, Any]]:
    """Verify a bundle (directory or archive) and return (bundle directory, manifest).

    An archive is safely extracted into `work_dir` (new or empty; a temporary directory when None),
    which the caller owns and removes. A bundle that fails verification is never rerun.
    """
    bundle_dir, report = open_bundle(Path(path), work_dir, key=key)
    return bundle_dir, report.manifest or {}


# -- the re-run ---------------------------------------------------------------------------------------
@dataclass
class ReproduceOutcome:
    bundle: Path
    run_dir: Path
    env_diffs: list[EnvDiff]
    comparison: MetricComparison

    @property
    def passed(self) -> bool:
        return self.comparison.passed

    def render(self) -> str:
        head = f"# Reproduction of {self.bundle.name}\n\nRe-run: {self.run_dir}\n\n"
        return head + render_reproduce(self.env_diffs, self.comparison)


def _sealed_data_paths(bundle_dir: Path, data_manifest: dict[str, Any]) -> dict[str, str]:
    """Map each recipe data entry to a file whose sha256 matches the sealed one.

    Bundled copies (data/) win; otherwise the recorded location (a built-in, or the original path)
    is used if its content is still the same. Anything else is an error: rerunning on other data
    would "reproduce" nothing.
    """
    from ft.config import resolve_path
    from ft.fsutil import sha256_file

    bundled = {sha256_file(p): p for p in (bundle_dir / "data").glob("*") if p.is_file()}
    mapping = {}
    for f in data_manifest.get("files", []):
        if f["sha256"] in bundled:
            mapping[f["name"]] = str(bundled[f["sha256"]])
            continue
        try:
            original = resolve_path(f["name"])
        except FtError:
            original = None
        if original is not None and original.is_file() and sha256_file(original) == f["sha256"]:
            mapping[f["name"]] = f["name"]
        else:
            raise FtError(
                f"{f['name']}: the sealed data is not in the bundle and the file at its recorded path is "
                "missing or changed; ask for a bundle made with --include-data"
            )
    return mapping


def reproduce(bundle: Path, work_dir: Path) -> ReproduceOutcome:
    """Verify the bundle, re-run its exact recipe on its exact data, compare environment and metrics."""
    import json

    import yaml

    from ft import backends, manifest, pipeline
    from ft.config import settings_from_dict

    work_dir = Path(work_dir)
    bundle_dir, _manifest = load_bundle(Path(bundle), work_dir / "bundle")
    recipe = yaml.safe_load((bundle_dir / "recipe.resolved.yaml").read_text(encoding="utf-8"))
    data_manifest = json.loads((bundle_dir / "data.json").read_text(encoding="utf-8"))
    paths = _sealed_data_paths(bundle_dir, data_manifest)
    recipe["data"]["train"] = [paths.get(p, p) for p in recipe["data"]["train"]]
    recipe["data"]["eval"] = [paths.get(p, p) for p in recipe["data"]["eval"]]
    recipe["output"] = {**recipe.get("output", {}), "dir": str(work_dir / "runs"), "run_name": "rerun"}
    settings = settings_from_dict(recipe, str(bundle_dir / "recipe.resolved.yaml"))

    backends.prepare(
        settings
    )  # Unsloth, if it is the backend here, before the data check imports transformers
    prep = pipeline.check_data(settings)
    run_dir = pipeline.create_run(prep)
    pipeline.train_stage(prep, run_dir, resume=None)
    new_report = pipeline.eval_stage(prep, run_dir)

    sealed_env = json.loads((bundle_dir / "env.json").read_text(encoding="utf-8"))
    sealed_report = json.loads((bundle_dir / "eval" / "report.json").read_text(encoding="utf-8"))
    return ReproduceOutcome(
        bundle=Path(bundle),
        run_dir=run_dir,
        env_diffs=compare_env(sealed_env, manifest.capture(full=False)),
        comparison=compare_metrics(sealed_report, new_report, settings.eval.reproduce_tolerance),
    )
