"""The forgetting check: lm-evaluation-harness tasks scored on the base and the tuned model.

The model eval already loaded (base + adapter) is wrapped in the harness's HFLM and scored twice, with
the adapter disabled and enabled, under the same harness settings, so the comparison isolates what the
adapter changed and the weights are loaded once (in 4-bit on a GPU, as ft evaluates them).

Entries of `eval.benchmarks`: `builtin:NAME` (a task shipped in ft/eval/tasks/), a path to a task YAML
(relative `data_files` are read against the YAML's folder; the harness itself would read them against
the working directory, so ft writes a YAML with absolute paths into a temporary folder that `include`s
the user's file), or the name of a harness task (its data is downloaded, so it needs network access).
lm-eval is imported only here and only when benchmarks are set: it is heavy (`pip install 'ft[benchmarks]'`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ft.errors import FtError
from ft.fsutil import sha256_file

BUILTIN = "builtin:"
# Dataset builders that read local files: only their relative data_files are made absolute (a Hub
# dataset's data_files name files inside the dataset repository).
_FILE_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}
_HARNESS_LOGGERS = ("lm-eval", "lm_eval")


@dataclass
class Task:
    entry: str  # as written in eval.benchmarks
    name: str  # the harness task name (report key)
    yaml: Path | None = None  # local task file; None for a named harness task
    config: dict[str, Any] | None = None  # the local task's YAML (includes merged), functions unresolved


def builtin_tasks() -> dict[str, Path]:
    root = resources.files("ft.eval") / "tasks"
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def _harness():
    try:
        import lm_eval
        from lm_eval.tasks import _yaml_loader  # noqa: F401  (checked here: the loader below needs it)
    except ImportError as exc:
        raise FtError(
            f"eval.benchmarks needs lm-evaluation-harness, which is not installed ({exc})",
            hint="pip install 'ft[benchmarks]' (lm-eval==0.4.13), or set eval.benchmarks to []",
        ) from None
    return lm_eval


def _read_task_yaml(entry: str, path: Path) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    if not path.is_file():
        raise FtError(f"eval.benchmarks: {entry}: task file not found")
    try:
        cfg = load_yaml(path, resolve_func=False)
    except (yaml.YAMLError, OSError, ValueError) as exc:
        raise FtError(f"eval.benchmarks: {path}: not a readable task YAML: {exc}") from None
    if not isinstance(cfg.get("task"), str) or not cfg["task"]:
        raise FtError(
            f"eval.benchmarks: {path}: needs `task: NAME` (one task per file; groups: name a harness task)"
        )
    return cfg


def resolve(entries: list[str]) -> list[Task]:
    """The tasks of eval.benchmarks, checked before any model is loaded (the harness is installed, task
    files exist and name one task each, no name twice); named harness tasks are looked up by `run`."""
    _harness()
    from ft.config import _suggest

    builtins = builtin_tasks()
    tasks: list[Task] = []
    for entry in entries:
        if entry.startswith(BUILTIN):
            name = entry.removeprefix(BUILTIN)
            if name not in builtins:
                raise FtError(
                    f"eval.benchmarks: {entry}: no such built-in task{_suggest(name, list(builtins))} "
                    f"(built-in: {', '.join(sorted(builtins))})"
                )
            path = builtins[name]
        elif entry.endswith((".yaml", ".yml")):
            path = Path(entry).expanduser()
        else:
            tasks.append(Task(entry, entry))
            continue
        cfg = _read_task_yaml(entry, path)
        tasks.append(Task(entry, cfg["task"], path.resolve(), cfg))
    seen: dict[str, str] = {}
    for t in tasks:
        if t.name in seen:
            raise FtError(f"eval.benchmarks: {seen[t.name]} and {t.entry} both define task {t.name!r}")
        seen[t.name] = t.entry
    return tasks


def _absolute(files: Any, folder: Path) -> Any:
    if isinstance(files, dict):
        return {k: _absolute(v, folder) for k, v in files.items()}
    if isinstance(files, list):
        return [_absolute(v, folder) for v in files]
    if isinstance(files, str) and "://" not in files and not Path(files).expanduser().is_absolute():
        return str((folder / files).resolve())
    return files


def _local_files(files: Any) -> list[Path]:
    if isinstance(files, dict):
        return [p for v in files.values() for p in _local_files(v)]
    if isinstance(files, list):
        return [p for v in files for p in _local_files(v)]
    return [Path(files)] if isinstance(files, str) and "://" not in files else []


def write_task_yaml(task: Task, out_dir: Path) -> Path:
    """A YAML in `out_dir` that includes the task's file and overrides its data_files with absolute paths."""
    assert task.yaml is not None and task.config is not None
    doc: dict[str, Any] = {"include": str(task.yaml), "task": task.name}
    kwargs = task.config.get("dataset_kwargs")
    if (
        task.config.get("dataset_path") in _FILE_BUILDERS
        and isinstance(kwargs, dict)
        and "data_files" in kwargs
    ):
        files = _absolute(kwargs["data_files"], task.yaml.parent)
        for f in _local_files(files):
            if not f.is_file():
                raise FtError(f"eval.benchmarks: {task.yaml}: data file {f} not found")
        # Arrow copies of local files are not worth keeping: they go with the temporary folder, not into
        # the user's datasets cache.
        doc["dataset_kwargs"] = {"cache_dir": str(out_dir / "datasets-cache"), **kwargs, "data_files": files}
    out = out_dir / f"{task.name}.yaml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return out


def _files_of(task: Task, generated: Path) -> dict[str, str]:
    """sha256 of a local task's YAML and data files, so a report names exactly what was scored."""
    if task.yaml is None:
        return {}
    files = {task.yaml.name: sha256_file(task.yaml)}
    data = (yaml.safe_load(generated.read_text(encoding="utf-8")).get("dataset_kwargs") or {}).get(
        "data_files"
    )
    for f in _local_files(data):
        files[f.name] = sha256_file(f)
    return files


def _headline(results: dict[str, Any], name: str) -> tuple[str, str]:
    """(metric, result key) the check is about: the task's first metric (its metric_list order)."""
    row = results["results"].get(name) or {}
    for key, value in row.items():
        metric, sep, _filter = key.partition(",")
        if sep and not metric.endswith("_stderr") and isinstance(value, int | float):
            return metric, key
    raise FtError(f"eval.benchmarks: task {name!r} reported no numeric metric (got {sorted(row)})")


@contextlib.contextmanager
def _quiet_harness():
    """The harness logs setup details at WARNING on every call (e.g. that it was handed a loaded model),
    and after each evaluation probes its environment: torch's collect_env (~5 s, runs nvidia-smi and pip)
    and `git describe` in the working directory (git's "fatal: not a git repository" on the console outside
    one). env.json already records the environment, so those two probes are skipped while ft calls it."""
    from lm_eval import evaluator

    loggers = [logging.getLogger(n) for n in _HARNESS_LOGGERS]
    levels = [lg.level for lg in loggers]
    probes = {"add_env_info": lambda storage: None, "get_git_commit_hash": lambda: None}
    saved = {name: getattr(evaluator, name) for name in probes if hasattr(evaluator, name)}
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    for name in saved:
        setattr(evaluator, name, probes[name])
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(evaluator, name, original)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def run(model, tokenizer, tasks: list[Task], *, limit: int | None, batch_size: int) -> dict[str, Any]:
    """Score `tasks` on `model` (a peft model) with its adapter disabled, then enabled.

    Returns {"tasks": {name: {source, metric, higher_is_better, base, tuned, base_stderr, tuned_stderr,
    samples, files}}, "harness": {...settings...}}; the keep/discard check is metrics.decide's.
    """
    lm_eval = _harness()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = [t.name for t in tasks]
    with tempfile.TemporaryDirectory(prefix="ft-benchmarks-") as tmp, _quiet_harness():
        generated = {t.name: write_task_yaml(t, Path(tmp)) for t in tasks if t.yaml is not None}
        # Indexing the harness's own task folders takes ~10 s: only when a named task needs it.
        named = [t for t in tasks if t.yaml is None]
        manager = TaskManager(include_path=tmp, include_defaults=bool(named))
        unknown = [t.entry for t in named if t.name not in manager.all_tasks]
        if unknown:
            raise FtError(
                f"eval.benchmarks: {', '.join(unknown)}: not a harness task, a task YAML, or builtin:NAME"
            )
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)

        def score(desc: str) -> dict[str, Any]:
            print(f"benchmarks ({desc}): {', '.join(names)}", file=sys.stderr, flush=True)
            try:
                return lm_eval.simple_evaluate(
                    model=lm,
                    tasks=names,
                    task_manager=manager,
                    limit=limit,
                    log_samples=False,
                    bootstrap_iters=1000,
                )
            except (ConnectionError, OSError) as exc:
                raise FtError(
                    f"eval.benchmarks: could not load the data of {', '.join(names)}: {exc}",
                    hint="named harness tasks download their data; offline, use a task YAML with local files",
                ) from None

        with model.disable_adapter():
            base = score("base")
        tuned = score("tuned")

        out: dict[str, Any] = {}
        for t in tasks:
            metric, key = _headline(base, t.name)
            stderr_key = key.replace(",", "_stderr,", 1)
            better = (base.get("higher_is_better", {}).get(t.name) or {}).get(metric, True)
            samples = (base.get("n-samples", {}).get(t.name) or {}).get("effective")
            out[t.name] = {
                "source": t.entry,
                "metric": metric,
                "higher_is_better": bool(better),
                "base": float(base["results"][t.name][key]),
                "tuned": float(tuned["results"][t.name][key]),
                "base_stderr": _num(base["results"][t.name].get(stderr_key)),
                "tuned_stderr": _num(tuned["results"][t.name].get(stderr_key)),
                "samples": samples,
                "files": _files_of(t, generated[t.name]) if t.name in generated else {},
            }
    harness = {
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "limit": limit,
        "batch_size": batch_size,
        "num_fewshot": {t.name: base.get("n-shot", {}).get(t.name) for t in tasks},
        "adapter": "disabled for base, enabled for tuned (one loaded model)",
    }
    return {"tasks": out, "harness": harness}


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) else None
