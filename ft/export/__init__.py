"""`ft export`: a sealed run's adapter as a model people can run, each format proved by loading it back.

    merged  the LoRA merged into its base (ft.export.merge), sharded safetensors + tokenizer
    gguf    llama.cpp's converter on the merged model: f16, then each `export.quantizations`
    ollama  a Modelfile beside the GGUF whose TEMPLATE renders what the chat template renders

Every format answers the held-out prompts in its own runtime and is scored like the adapter
(ft.export.check); the results go to export/report.json and report.md. The export is sealed as a sibling
bundle, `<bundles>/exports/<run>/`: the source bundle's files plus export/, packaged by ft.bundle, so
`ft verify` covers every export file. It is built in a hidden staging directory and swapped in only when
complete, so a failed or interrupted export (a full disk) leaves the previous one as it was. An export
whose metrics drop past `export.max_metric_drop` is still sealed (for inspection) and then reported as
an error naming the metric.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ft.errors import FtError

FORMATS = ("merged", "gguf", "ollama")
EXPORTS_DIR = "exports"


@dataclass
class ExportResult:
    bundle: Path
    report: dict[str, Any]
    breaches: list[str] = field(default_factory=list)


def parse_formats(value: str | list[str]) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in (i.strip() for i in items):
        if item == "all":
            out += list(FORMATS)
        elif item in FORMATS:
            out.append(item)
        else:
            raise FtError(f"export: unknown format {item!r}; choose from {', '.join(FORMATS)} or all")
    return [f for f in FORMATS if f in out]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FtError(f"{path}: cannot read ({exc})") from None


def _source(path: Path, work: Path) -> tuple[Path, str | None]:
    """The run or bundle directory to export from (a bundle is verified first) and its identity."""
    from ft.bundle import MANIFEST, open_bundle

    if path.is_file() or (path.is_dir() and (path / MANIFEST).is_file()):
        src, _report = open_bundle(path, None if path.is_dir() else work / "source")
        from ft.fsutil import sha256_file

        return src, sha256_file(src / MANIFEST)
    if path.is_dir() and (path / "run.json").is_file():
        return path, None
    raise FtError(f"{path}: not a bundle (directory or .tar.gz) or a run directory")


def _check_exportable(src: Path, force: bool) -> None:
    if not (src / "adapter" / "adapter_config.json").is_file():
        raise FtError(f"{src}: no adapter (adapter/adapter_config.json); train the run before exporting it")
    report_path = src / "eval" / "report.json"
    if not report_path.is_file():
        raise FtError(f"{src}: not evaluated (no eval/report.json); run `ft eval` before exporting")
    verdict = ((_read_json(report_path) or {}).get("decision") or {}).get("verdict")
    if verdict != "KEEP" and not force:
        raise FtError(
            f"{src}: the run's evaluation verdict is {verdict!r}, not KEEP; the adapter did not earn an export",
            hint="export it anyway with `ft export --force`",
        )


def _copy_source(src: Path, dest: Path) -> None:
    from ft.bundle import BUNDLED_DIRS, OPTIONAL, REQUIRED

    for rel in REQUIRED + OPTIONAL:
        if (src / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dest / rel)
    for top in BUNDLED_DIRS:
        if top != "export" and (src / top).is_dir():
            shutil.copytree(src / top, dest / top, dirs_exist_ok=True)


def _size(path: Path) -> int:
    return (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


def _swap_in(new_bundle: Path, sidecar: Path, final: Path) -> None:
    """Replace `final` (and its sidecar) by the new bundle; the old one is removed only afterwards."""
    from ft.bundle import identity

    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(new_bundle, final)
    if sidecar.is_file():
        os.replace(sidecar, identity.sidecar_path(final))
    shutil.rmtree(old, ignore_errors=True)


def export(
    source: Path,
    formats: list[str],
    *,
    out_dir: Path | None = None,
    quantizations: list[str] | None = None,
    force: bool = False,
    progress=None,
) -> ExportResult:
    """Export a run or bundle to `formats`, check each, and seal the result as `<out_dir>/<run>/`."""
    from ft.export import check, llamacpp, merge, modelfile
    from ft.fsutil import disk_error, is_disk_full
    from ft.pipeline import settings_of_run

    source = Path(source)
    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not formats:
        raise FtError("export: no formats given (--to merged|gguf|ollama|all, or export.formats)")
    if "ollama" in formats and "gguf" not in formats:
        formats = [f for f in FORMATS if f in (*formats, "gguf")]
    if not (source.is_file() or (source / "MANIFEST.json").is_file() or (source / "run.json").is_file()):
        raise FtError(f"{source}: not a bundle (directory or .tar.gz) or a run directory")
    out_dir = Path(out_dir) if out_dir is not None else source.parent / EXPORTS_DIR
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".ft-export.", suffix=".partial", dir=out_dir))
    try:
        src, source_identity = _source(source, work)
        _check_exportable(src, force)
        settings = settings_of_run(src)
        quants = list(settings.export.quantizations if quantizations is None else quantizations)
        for q in quants:
            if q not in llamacpp.QUANTS:
                raise FtError(f"export: unknown quantisation {q!r}; known: {', '.join(llamacpp.QUANTS)}")
        if "gguf" in formats:
            llamacpp.require()
        ref = check.load_reference(src)
        run_dir = work / "run"
        run_dir.mkdir()
        _copy_source(src, run_dir)
        exp = run_dir / "export"
        exp.mkdir()
        timings: dict[str, float] = {}
        rows: list[dict[str, Any]] = []

        t0 = time.perf_counter()
        merged_dir = exp / "merged" if "merged" in formats else work / "merged"
        merged_dir.mkdir()
        progress("export: merging the adapter into the base")
        facts = merge.merge(
            settings, src / "adapter", merged_dir, logit_prompts=ref.prompts[: check.LOGIT_PROMPTS]
        )
        adapter_logits = facts.pop("adapter_logits")
        timings["merge_s"] = time.perf_counter() - t0
        if "merged" in formats:
            t0 = time.perf_counter()
            run = check.run_merged(settings, merged_dir, ref)
            diff = max(
                float((a - b).abs().max()) for a, b in zip(adapter_logits, run.pop("logits"), strict=True)
            )
            run["max_logit_diff"] = diff
            run["logit_tolerance"] = check.LOGIT_TOLERANCE[facts["dtype"]]
            row = check.compare(settings, "merged", ref, run, _size(merged_dir))
            if diff > run["logit_tolerance"]:
                row["breaches"].append("logits")
            rows.append(row)
            timings["check_merged_s"] = time.perf_counter() - t0

        gguf_files: dict[str, str] = {}
        if "gguf" in formats:
            from transformers import AutoTokenizer

            from ft.testing import TINY_MODEL

            gdir = exp / "gguf"
            gdir.mkdir()
            f16 = gdir / "model-f16.gguf"
            progress("export: converting to GGUF f16 with llama.cpp's converter")
            t0 = time.perf_counter()
            pre = "qwen2" if settings.model.name_or_path == TINY_MODEL else None
            llamacpp.convert(merged_dir, f16, outtype="f16", pre_tokenizer=pre)
            timings["convert_s"] = time.perf_counter() - t0
            gguf_files["f16"] = f16.name
            t0 = time.perf_counter()
            for q in quants:
                progress(f"export: quantising to {q}")
                llamacpp.quantize(f16, gdir / f"model-{q}.gguf", q)
                gguf_files[q] = f"model-{q}.gguf"
            timings["quantize_s"] = time.perf_counter() - t0
            hf_tok = AutoTokenizer.from_pretrained(merged_dir)
            embedded = llamacpp.gguf_metadata(f16, ("tokenizer.chat_template",)).get(
                "tokenizer.chat_template"
            )
            for fmt, name in gguf_files.items():
                progress(f"export: checking {name} in llama.cpp")
                t0 = time.perf_counter()
                run = check.run_gguf(settings, gdir / name, ref, hf_tok)
                run["tensor_types"] = llamacpp.tensor_types(gdir / name)
                row = check.compare(settings, fmt, ref, run, (gdir / name).stat().st_size)
                row["chat_template_embedded"] = embedded == hf_tok.chat_template
                if not row["chat_template_embedded"]:
                    row["breaches"].append("chat_template")
                rows.append(row)
                timings[f"check_{fmt}_s"] = time.perf_counter() - t0
            if "ollama" in formats:
                from transformers import GenerationConfig

                target = gguf_files[quants[0]] if quants else gguf_files["f16"]
                text, _ = modelfile.build(
                    hf_tok,
                    target,
                    system=settings.data.system_prompt,
                    generation_config=GenerationConfig.from_pretrained(merged_dir),
                )
                (gdir / "Modelfile").write_text(text, encoding="utf-8")

        from ft.manifest import capture

        report = {
            "format": "ft-export/1",
            "bundle": src.name,
            "source_identity": source_identity,
            "formats": formats,
            "quantizations": quants if "gguf" in formats else [],
            "merged": facts,
            "gguf": gguf_files,
            "llama_cpp": llamacpp.facts() if "gguf" in formats else None,
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "formats_checked": rows,
        }
        report_md = check.render_md({**report, "formats": rows})
        (exp / "report.json").write_text(
            json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        (exp / "report.md").write_text(report_md, encoding="utf-8")
        (exp / "env.json").write_text(
            json.dumps(capture(), indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        from ft.bundle import identity, package

        sign = Path(settings.export.sign_key) if settings.export.sign_key else None
        new = package(run_dir, work / "sealed", sign_key=sign, archive=False)
        final = out_dir / new.name
        _swap_in(new, identity.sidecar_path(new), final)
    except FtError:
        raise
    except Exception as exc:
        # A native writer (safetensors, llama.cpp) on a full disk may not raise OSError: ask the disk.
        if isinstance(exc, OSError) or is_disk_full(exc, out_dir):
            raise disk_error(out_dir, exc, full=is_disk_full(exc, out_dir)) from exc
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created and not any(out_dir.iterdir()):  # a refused export leaves no empty exports/ behind
            out_dir.rmdir()
    breaches = [f"{r['format']}: {m}" for r in rows for m in r["breaches"]]
    return ExportResult(final, report, breaches)


def breach_message(result: ExportResult) -> str:
    parts = []
    for r in result.report["formats_checked"]:
        for m in r["breaches"]:
            if m in r["drop"]:
                parts.append(
                    f"{r['format']} {m} dropped {r['drop'][m]:.3f} below the adapter "
                    f"({r['metrics'].get(m, 0):.3f} vs {r['adapter_metrics'][m]:.3f}; allowed {r['max_metric_drop']})"
                )
            else:
                parts.append(f"{r['format']} {m} check failed")
    return f"export check failed: {'; '.join(parts)}; files kept in {result.bundle} (see export/report.md)"
