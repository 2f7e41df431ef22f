"""Compare a rerun with its sealed bundle: what differs in the environment, how far the metrics moved.

A rerun that gives different numbers is only useful if it also says why they might differ, so the
environment facts that most often change results (package versions, lockfile, image, GPU, driver,
CUDA) are set side by side with the sealed ones. Metrics pass when each tuned-model metric is within
the recipe's tolerance of the sealed value and the KEEP/DISCARD verdict is unchanged. This module only
compares; retraining is wired by the CLI.

A bundle comes from someone else, so rerunning it must not run its code: a model is never loaded from a
path inside a bundle (a model folder can carry Python files and pickles), and a recipe asking for
`model.trust_remote_code` is refused unless the user says so (`--trust-remote-code`) and the bundle's
signature verifies with the key they name. Every rerun gets a fresh work folder, removed whole when the
rerun fails.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ft.bundle import VerifyReport, open_bundle
from ft.bundle.identity import MANIFEST
from ft.errors import FtError
from ft.manifest import lock_summary

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
        # The sha256 alone vouches for nothing if other versions were installed (ft.manifest.lock_status).
        "installed vs lockfile": lock_summary(env.get("lock")),
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


def _inside(path: str, folder: Path) -> bool:
    return os.path.commonpath([path, os.path.realpath(folder)]) == os.path.realpath(folder)


def check_no_bundle_code(
    recipe: dict[str, Any],
    report: VerifyReport,
    bundle_dir: Path,
    work_root: Path,
    *,
    trust_remote_code: bool,
) -> None:
    """Refuse, before anything is loaded, a rerun that would run code the bundle brought or chose."""
    model = recipe.get("model") if isinstance(recipe.get("model"), dict) else {}
    name = str(model.get("name_or_path") or "")
    if model.get("trust_remote_code") is True:
        if not trust_remote_code:
            raise FtError(
                "recipe.resolved.yaml: model.trust_remote_code is true: refusing to run the model code for "
                f"{name!r} that this bundle asks for (it would execute on this machine); if you trust the "
                "bundle's signer, pass --trust-remote-code together with --key SIGNER.pub"
            )
        if not report.signed:
            raise FtError(
                "--trust-remote-code: refused because the bundle's signature was not checked "
                f"({'no --key given' if report.signature_present else 'the bundle is unsigned'}); model code "
                "named by a bundle runs only when its signature verifies with the key you name"
            )
    local = Path(name).expanduser()
    if name and not name.startswith("builtin:") and local.exists():
        real = os.path.realpath(local)
        in_a_bundle = any((Path(p) / MANIFEST).is_file() for p in [real, *map(str, Path(real).parents)])
        if _inside(real, bundle_dir) or _inside(real, work_root) or in_a_bundle:
            raise FtError(
                f"recipe.resolved.yaml: model.name_or_path {name!r} is inside a bundle ({real}); refusing to "
                "load it: ft reproduce never loads a model shipped in a bundle, whose folder can carry code "
                "and pickles that run when loaded; the sealed recipe must name a Hub model or a directory of "
                "your own"
            )


def _read_sealed(bundle_dir: Path, rel: str) -> Any:
    """A sealed JSON or YAML file, or one line saying why it cannot be read (no internal errors)."""
    import yaml

    path = bundle_dir / rel
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) if rel.endswith(".yaml") else json.loads(text)
    except RecursionError:
        raise FtError(f"{rel}: nested too deeply to read") from None
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise FtError(f"{rel}: cannot read ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    if not isinstance(data, dict):
        raise FtError(f"{rel}: not a mapping")
    return data


def fresh_work_dir(work_root: Path, bundle: Path) -> Path:
    """A new `WORK/<bundle>-<n>/` (n = 1, 2, ...): rerunning the same bundle never collides."""
    stem = Path(bundle).name.removesuffix(".tar.gz").removesuffix(".tgz") or "bundle"
    work_root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        candidate = work_root / f"{stem}-{n}"
        with contextlib.suppress(FileExistsError):
            candidate.mkdir()
            return candidate
    raise FtError(f"{work_root}: holds 9999 reruns of {stem}; remove old ones")


# -- the re-run ---------------------------------------------------------------------------------------
@dataclass
class ExportComparison:
    """The sealed export's f16 GGUF against the same conversion of the re-run's adapter.

    The f16 conversion is deterministic (tests/test_export.py), so it differs only where the weights
    do: identical adapters must give identical GGUF bytes; different adapters (another GPU, another
    kernel) make different bytes expected, and then the metrics comparison is the judge.
    """

    sealed_f16: str
    rerun_f16: str
    adapter_identical: bool
    export_bundle: Path

    @property
    def identical(self) -> bool:
        return self.sealed_f16 == self.rerun_f16

    @property
    def passed(self) -> bool:
        return self.identical or not self.adapter_identical

    def render(self) -> str:
        if self.identical:
            verdict = "identical"
        elif self.adapter_identical:
            verdict = "DIFFERS although the adapter is identical: the conversion is not reproducible here"
        else:
            verdict = "differs, as expected: the re-run's adapter differs from the sealed one"
        return (
            f"## Export (f16 GGUF, re-converted)\n\n"
            f"- sealed ({self.export_bundle.name}): `{self.sealed_f16}`\n"
            f"- re-run: `{self.rerun_f16}`\n"
            f"- {verdict}\n"
        )


@dataclass
class ReproduceOutcome:
    bundle: Path
    run_dir: Path
    env_diffs: list[EnvDiff]
    comparison: MetricComparison
    export: ExportComparison | None = None

    @property
    def passed(self) -> bool:
        return self.comparison.passed and (self.export is None or self.export.passed)

    def render(self) -> str:
        head = f"# Reproduction of {self.bundle.name}\n\nRe-run: {self.run_dir}\n\n"
        tail = f"\n{self.export.render()}" if self.export is not None else ""
        return head + render_reproduce(self.env_diffs, self.comparison) + tail


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
    files = data_manifest.get("files")
    if not isinstance(files, list) or not all(
        isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("sha256"), str)
        for f in files
    ):
        raise FtError("data.json: 'files' is not a list of {name, sha256} entries")
    for f in files:
        if f["sha256"] in bundled:
            mapping[f["name"]] = str(bundled[f["sha256"]])
            continue
        if f.get("format") == "hf":  # read again at the recorded commit; the rows' sha256 is compared after
            from ft.data.hub import pinned_name

            mapping[f["name"]] = pinned_name(f)
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


def _same_rows(sealed: dict[str, Any], now: dict[str, Any]) -> None:
    """The data read for the rerun must be the sealed data, byte for byte (a Hub split re-read from a
    cache, a file found at its old path): rerunning on other rows would reproduce nothing."""
    before = sorted(f["sha256"] for f in sealed.get("files", []))
    after = sorted(f["sha256"] for f in now.get("files", []))
    if before != after:
        changed = [f["name"] for f in now.get("files", []) if f["sha256"] not in before]
        raise FtError(
            f"{', '.join(changed) or 'the data'}: the rows read now differ from the sealed data "
            "(sha256); ask for a bundle made with --include-data"
        )


def reproduce(
    bundle: Path,
    work_root: Path,
    *,
    key: Path | None = None,
    trust_remote_code: bool = False,
    export_bundle: Path | None = None,
) -> ReproduceOutcome:
    """Verify the bundle, re-run its exact recipe on its exact data, compare environment and metrics.

    Everything goes into a fresh `work_root/<bundle>-<n>/`, removed whole (with `work_root`, when this
    call created it and left it empty) if anything fails.
    """
    work_root = Path(work_root)
    created_root = not work_root.exists()
    work = fresh_work_dir(work_root, Path(bundle))
    try:
        return _reproduce(
            Path(bundle),
            work,
            work_root,
            key=key,
            trust_remote_code=trust_remote_code,
            export_bundle=Path(export_bundle) if export_bundle is not None else None,
        )
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if created_root:
            with contextlib.suppress(OSError):
                work_root.rmdir()  # only when empty
        raise


def _reproduce(
    bundle: Path,
    work: Path,
    work_root: Path,
    *,
    key: Path | None,
    trust_remote_code: bool,
    export_bundle: Path | None = None,
) -> ReproduceOutcome:
    from ft.config import settings_from_dict

    bundle_dir, report = open_bundle(bundle, work / "bundle", key=key)
    recipe = _read_sealed(bundle_dir, "recipe.resolved.yaml")
    check_no_bundle_code(recipe, report, bundle_dir, work_root, trust_remote_code=trust_remote_code)
    settings_from_dict(recipe, str(bundle_dir / "recipe.resolved.yaml"))  # its shape, before it is edited
    data_manifest = _read_sealed(bundle_dir, "data.json")
    sealed_env = _read_sealed(bundle_dir, "env.json")
    sealed_report = _read_sealed(bundle_dir, "eval/report.json")
    paths = _sealed_data_paths(bundle_dir, data_manifest)
    recipe["data"]["train"] = [paths.get(p, p) for p in recipe["data"]["train"]]
    recipe["data"]["eval"] = [paths.get(p, p) for p in recipe["data"]["eval"]]
    if template := recipe["data"].get("chat_template"):  # a moved template file: the adapter's sealed copy
        from ft.data.chat_templates import sealed_file

        sealed = (data_manifest.get("tokenizer") or {}) if isinstance(data_manifest, dict) else {}
        recipe["data"]["chat_template"] = (
            sealed_file(template, sealed.get("chat_template_sha256"), bundle_dir, work) or template
        )
    recipe["output"] = {**recipe.get("output", {}), "dir": str(work / "runs"), "run_name": "rerun"}
    settings = settings_from_dict(recipe, str(bundle_dir / "recipe.resolved.yaml"))

    from ft import backends, manifest, pipeline

    backends.prepare(
        settings
    )  # Unsloth, if it is the backend here, before the data check imports transformers
    prep = pipeline.check_data(settings)
    _same_rows(data_manifest, prep.check.report)
    run_dir = pipeline.create_run(prep)
    pipeline.train_stage(prep, run_dir, resume=None)
    new_report = pipeline.eval_stage(prep, run_dir)
    return ReproduceOutcome(
        bundle=bundle,
        run_dir=run_dir,
        env_diffs=compare_env(sealed_env, manifest.capture(full=False)),
        comparison=compare_metrics(sealed_report, new_report, settings.eval.reproduce_tolerance),
        export=_compare_export(export_bundle, bundle_dir, run_dir, work) if export_bundle else None,
    )


F16_GGUF = "export/gguf/model-f16.gguf"
ADAPTER_WEIGHTS = "adapter/adapter_model.safetensors"


def _sealed_sha256(bundle_dir: Path, rel: str) -> str | None:
    manifest = _read_sealed(bundle_dir, MANIFEST)
    for entry in manifest.get("files", []) if isinstance(manifest, dict) else []:
        if isinstance(entry, dict) and entry.get("path") == rel:
            return entry.get("sha256")
    return None


def _compare_export(export_bundle: Path, bundle_dir: Path, run_dir: Path, work: Path) -> ExportComparison:
    """Verify the sealed export, check it was made from this bundle, re-convert the re-run, compare."""
    from ft.export import export
    from ft.fsutil import sha256_file

    export_dir, _ = open_bundle(export_bundle, work / "export-sealed")
    sealed_f16 = _sealed_sha256(export_dir, F16_GGUF)
    if sealed_f16 is None:
        raise FtError(f"{export_bundle}: no {F16_GGUF} in this export; export it with `ft export --to gguf`")
    made_from = _read_sealed(export_dir, "export/report.json").get("source_identity")
    if made_from != sha256_file(bundle_dir / MANIFEST):
        raise FtError(
            f"{export_bundle}: this export was made from another bundle (identity {made_from}), not from "
            f"the one being reproduced"
        )
    result = export(run_dir, ["gguf"], out_dir=work / "exports", quantizations=[], force=True)
    return ExportComparison(
        sealed_f16=sealed_f16,
        rerun_f16=sha256_file(result.bundle / F16_GGUF),
        adapter_identical=_sealed_sha256(bundle_dir, ADAPTER_WEIGHTS)
        == sha256_file(run_dir / ADAPTER_WEIGHTS),
        export_bundle=export_bundle,
    )
