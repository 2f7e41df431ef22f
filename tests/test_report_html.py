"""report.html and `ft report`: built from a run's files (a synthetic run here, so no training), self-
contained, escaped, and written into every evaluated run and so into its bundle."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from ft.cli import main
from ft.report import html as report_html
from ft.report.examples import NO_LABEL, diff_segments, label_views

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'
GIB = 2**30


def _ticket(name, city, category):
    return json.dumps({"name": name, "city": city, "category": category})


def make_run(
    root: Path, name: str = "tiny-a", *, lr: float = 1e-2, gpu: bool = False, hostile: bool = False
) -> Path:
    """A finished run's files as ft writes them (the fields report.html reads), without training."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "run.json").write_text(
        json.dumps(
            {
                "name": "<script>alert(1)<script>" if hostile else name,  # shown in chart titles too
                "status": "complete",
                "backend": "hf",
                "device": "cuda" if gpu else "cpu",
                "created": "2026-12-01T10:00:00Z",
                "completed": "2026-12-01T10:05:00Z",
            }
        )
    )
    recipe = {
        "name": "tiny",
        "description": HOSTILE if hostile else "smoke",
        "model": {"name_or_path": "builtin:tiny-qwen2"},
        "lora": {"r": 16, "alpha": 32},
        "train": {"learning_rate": lr, "max_seq_length": 128},
        "data": {"label_field": "category", "labels": ["billing", "shipping"]},
        "eval": {"worst_examples": 2, "primary_metric": "schema_valid"},
        "output": {"dir": str(root)},
    }
    (run / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe))
    rows = []
    for step in range(1, 21):
        row = {
            "step": step,
            "kind": "train",
            "loss": 5.0 / step,
            "learning_rate": lr * (1 - step / 20),
            "tokens_per_s": 1000.0 + step,
        }
        if gpu:
            row.update(gpu_memory_bytes=2 * GIB + step, gpu_peak_bytes=3 * GIB)
        rows.append(row)
    rows += [{"step": 10, "kind": "eval", "eval_loss": 1.5}, {"step": 20, "kind": "eval", "eval_loss": 1.2}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 21, "ki')
    base = {"exact_match": 0.0, "schema_valid": 0.0, "label_accuracy": 0.25, "eval_loss": 6.0}
    tuned = {
        "exact_match": 0.0,
        "schema_valid": 0.75,
        "label_accuracy": 0.5 if lr > 5e-3 else 0.75,
        "eval_loss": 1.2,
    }
    (run / "eval" / "report.json").write_text(
        json.dumps(
            {
                "examples": 4,
                "generation": {"max_new_tokens": 32},
                "metrics": {"base": base, "tuned": tuned},
                "decision": {
                    "verdict": "KEEP",
                    "reasons": ["primary schema_valid improved " + (HOSTILE if hostile else "")],
                },
                "rule": {
                    "primary_metric": "schema_valid",
                    "min_improvement": 0.5,
                    "guard_metrics": ["label_accuracy"],
                    "max_regression": 0.02,
                },
            }
        )
    )
    preds = [
        ("a", _ticket("Ann", "Oslo", "billing"), "garbage", _ticket("Ann", "Oslo", "billing")),
        ("b", _ticket("Bo", "Rome", "billing"), "{}", _ticket("Bo", "Lima", "shipping")),
        ("c", _ticket("Cy", "Kyiv", "shipping"), "x", "not json"),
        (
            "d",
            _ticket("Di", "Pune", "shipping"),
            _ticket("Di", "Pune", "shipping"),
            _ticket("Di", "Pune", "shipping"),
        ),
    ]
    if hostile:
        preds[0] = ("a", _ticket("Ann", "Oslo", "billing"), HOSTILE, _ticket(HOSTILE, "Oslo", "billing"))
    with (run / "eval" / "predictions.jsonl").open("w") as f:
        for i, ref, b, t in preds:
            ok = float(t.startswith('{"name"'))
            f.write(
                json.dumps(
                    {
                        "id": i,
                        "prompt": (HOSTILE if hostile else "ticket ") + i,
                        "reference": ref,
                        "base": b,
                        "tuned": t,
                        "base_scores": {"schema_valid": 0.0, "token_f1": 0.0},
                        "tuned_scores": {"schema_valid": ok, "token_f1": 0.5 * ok + (i == "d") * 0.5},
                    }
                )
                + "\n"
            )
    (run / "data.json").write_text(
        json.dumps(
            {
                "files": [{"role": "train", "name": "t.jsonl", "rows": 24, "sha256": "ab" * 32}],
                "rows": {"read": 24, "train": 20, "eval": 4},
                "shapes": {"messages": 24},
                "dropped": {"duplicate": {"count": 1, "first": []}, "too_long": {"count": 0, "first": []}},
                "tokens": {
                    "rows": 23,
                    "min": 20,
                    "p50": 40,
                    "p90": 60,
                    "p99": 70,
                    "max": 72,
                    "histogram": {"edges": [20, 40, 60, 80], "counts": [10, 10, 3]},
                },
                "labels": {
                    "field": "category",
                    "declared": ["billing", "shipping"],
                    "train": {"billing": 10, "shipping": 10},
                    "eval": {"billing": 2, "shipping": 2},
                },
                "split": {"method": "seeded", "seed": 1, "eval_ids": ["x"]},
            }
        )
    )
    env = {
        "python": "3.11.7",
        "os": "Linux",
        "captured": "2026-12-01T10:00:00Z",
        "git_commit": "abc123",
        "gpu": {"devices": [{"name": "NVIDIA H100 80GB HBM3"}], "driver": "580.1", "cuda_runtime": "13.0"}
        if gpu
        else {"devices": [], "driver": None},
        "packages": {"torch": "2.13.0", "transformers": "5.17.0"},
        "lockfile": {"name": "cpu.txt", "sha256": "cd" * 32},
        "lock": "matches",
        "image": {"id": "sha256:feed"},
        "run": {"micro_batch": 4},
    }
    (run / "env.json").write_text(json.dumps(env))
    return run


def svgs_with_paths(page: str) -> int:
    return sum(1 for svg in re.findall(r"<svg.*?</svg>", page, re.S) if "<path" in svg)


def test_run_page_has_every_section(tmp_path):
    page = report_html.render_run(make_run(tmp_path))
    assert svgs_with_paths(page) == 4  # loss, learning rate, tokens/s, length histogram
    assert "GPU memory: No GPU memory in metrics.jsonl: a CPU run" in page  # the one series a CPU run lacks
    assert "KEEP" in page and "primary schema_valid improved" in page
    assert "schema-valid" in page and "+0.7500" in page  # metric table with changes
    assert "Confusion matrix" in page and NO_LABEL in page  # "not json" counted as no label
    assert "Worst examples" in page and "Best examples" in page and "<mark>" in page
    assert "dropped: duplicate" in page and "cpu.txt" in page and "matches" in page and "sha256:feed" in page
    assert "Trained without a CUDA GPU" in page


def test_page_is_self_contained_and_deterministic(tmp_path):
    run = make_run(tmp_path)
    page = report_html.render_run(run)
    assert not re.search(r"<(script|link|iframe|img)\b", page, re.I)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page, re.I)
    assert "@media print" in page
    assert page == report_html.render_run(run)


def test_hostile_data_renders_as_text(tmp_path):
    page = report_html.render_run(make_run(tmp_path, hostile=True))
    assert "<script" not in page.lower() and "<img" not in page.lower()
    assert "&lt;script&gt;alert(" in page  # shown, not run


def test_gpu_run_shows_memory_and_the_size_prediction(tmp_path, monkeypatch):
    import ft.sizing

    seen = {}

    def fake_size_report(settings, *, gpu=None, micro_batch=None, **kw):
        seen.update(gpu=gpu, micro_batch=micro_batch)
        return SimpleNamespace(estimate=SimpleNamespace(peak_allocated_bytes=int(3.5 * GIB)))

    monkeypatch.setattr(ft.sizing, "size_report", fake_size_report)
    monkeypatch.setattr("ft.pipeline.settings_of_run", lambda run_dir: object())
    page = report_html.render_run(make_run(tmp_path, gpu=True))
    assert svgs_with_paths(page) == 5 and "GPU memory:" not in page
    assert seen == {"gpu": "NVIDIA H100 80GB HBM3", "micro_batch": 4}
    assert "3.50 GiB" in page and "3.00 GiB" in page  # predicted beside measured


def test_diff_marks_only_what_differs():
    segs = diff_segments('{"name": "Ann"}', '{"name": "Bob"}')
    assert [t for k, t in segs if k == "diff"] == ["Bob"]
    assert "".join(t for _, t in segs) == '{"name": "Bob"}'


def test_labels_per_label_accuracy_and_confusion():
    preds = [
        {"reference": _ticket("a", "b", "billing"), "base": "x", "tuned": _ticket("a", "b", "billing")},
        {"reference": _ticket("a", "b", "billing"), "base": "x", "tuned": _ticket("a", "b", "refund")},
        {"reference": _ticket("a", "b", "shipping"), "base": _ticket("a", "b", "shipping"), "tuned": "oops"},
    ]
    v = label_views(preds, "category", ["billing", "shipping"])
    assert v["columns"] == ["billing", "shipping", "refund", NO_LABEL]
    billing, shipping = v["rows"]
    assert billing["tuned"] == 0.5 and billing["cells"] == [1, 0, 1, 0]
    assert shipping["base"] == 1.0 and shipping["tuned"] == 0.0 and shipping["cells"] == [0, 0, 0, 1]


def test_compare_page(tmp_path, capsys, monkeypatch):
    a, b = make_run(tmp_path, "run-a", lr=1e-2), make_run(tmp_path, "run-b", lr=3e-3)
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(a), str(b)]) == 0
    page = (tmp_path / "compare-run-a-vs-run-b.html").read_text()
    assert "wrote compare-run-a-vs-run-b.html" in capsys.readouterr().out
    assert "train.learning_rate" in page and "0.003" in page
    assert "output.dir" not in page  # paths differ between any two runs; not a difference that matters
    assert "+0.2500" in page  # label accuracy B - A
    assert svgs_with_paths(page) == 4  # train loss, eval loss, learning rate, throughput, A and B overlaid


def test_ft_report_rebuilds_a_run_page(tmp_path, capsys):
    run = make_run(tmp_path)
    assert main(["report", str(run)]) == 0
    assert (run / "eval" / "report.html").is_file()
    assert str(run / "eval" / "report.html") in capsys.readouterr().out


def test_ft_report_on_a_bundle_writes_beside_it_and_keeps_it_sealed(tmp_path, capsys):
    from ft.bundle import package, verify

    run = make_run(tmp_path)
    assert main(["report", str(run)]) == 0
    bundle = package(run, tmp_path / "bundles")
    assert (bundle / "eval" / "report.html").is_file()  # eval/ is bundled, so the page is too
    assert main(["report", str(bundle)]) == 0
    assert (tmp_path / "bundles" / "tiny-a.report.html").is_file()
    (tmp_path / "bundles" / "tiny-a.report.html").unlink()
    assert main(["report", str(tmp_path / "bundles" / "tiny-a.tar.gz")]) == 0
    assert (tmp_path / "bundles" / "tiny-a.report.html").is_file()
    assert verify(bundle).ok


@pytest.mark.parametrize("args", [["nope"], ["a", "b", "c"]])
def test_ft_report_bad_targets_are_one_line_errors(tmp_path, capsys, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    assert main(["report", *args]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_tampered_bundle_is_refused(tmp_path, capsys):
    from ft.bundle import package

    bundle = package(make_run(tmp_path), tmp_path / "bundles", archive=False)
    (bundle / "eval" / "report.json").write_text("{}")
    assert main(["report", str(bundle)]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "bundles" / "tiny-a.report.html").exists()


def test_eval_outputs_include_the_page(tmp_path, tiny_settings):
    from ft.report.eval_report import write_eval_outputs

    run = make_run(tmp_path)
    report = json.loads((run / "eval" / "report.json").read_text())
    preds = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    (run / "eval" / "report.json").unlink()
    write_eval_outputs(run, report, preds, tiny_settings(), {"path": "env.json", "sha256": "0" * 64})
    page = (run / "eval" / "report.html").read_text()
    assert "KEEP" in page and "Confusion matrix" in page  # rendered from the evaluation in memory


def test_a_page_that_fails_costs_a_warning_not_the_evaluation(tmp_path, tiny_settings, monkeypatch, capsys):
    from ft.report.eval_report import write_eval_outputs

    def broken(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(report_html, "write_run_report", broken)
    run = make_run(tmp_path)
    report = json.loads((run / "eval" / "report.json").read_text())
    write_eval_outputs(run, report, [], tiny_settings(), {"path": "env.json", "sha256": "0" * 64})
    assert (run / "eval" / "report.json").is_file()
    assert "warning: eval/report.html not written (RuntimeError: boom)" in capsys.readouterr().err


def test_forgetting_check_scores_base_vs_tuned(tmp_path):
    run = make_run(tmp_path)
    report = json.loads((run / "eval" / "report.json").read_text())
    report["rule"]["max_benchmark_drop"] = 0.1
    report["benchmark_harness"] = {"lm_eval_version": "0.4.13", "limit": 20}
    report["benchmarks"] = {
        "ft_general_mc": {"metric": "acc", "base": 0.6, "tuned": 0.5, "relative_change": -1 / 6, "ok": False},
        "<b>mine</b>": {"metric": "acc", "base": 0.5, "tuned": 0.5, "relative_change": 0.0, "ok": True},
    }
    page = report_html.render_run(run, report=report)
    assert "forgetting check" in page and "ft_general_mc" in page and "-16.7%" in page and "FAILS" in page
    assert "&lt;b&gt;mine&lt;/b&gt;" in page and "drop by at most\n10%" in page
    assert "forgetting check" not in report_html.render_run(make_run(tmp_path, "plain"))


def test_long_runs_are_thinned_not_megabytes():
    from ft.report.charts import MAX_POINTS, _thin, line_chart

    xs = list(range(100_000))
    tx, ty = _thin(xs, [float(x) for x in xs])
    assert len(tx) <= MAX_POINTS + 1 and tx[0] == 0 and tx[-1] == 99_999 and tx == [int(y) for y in ty]
    assert len(line_chart([("loss", xs, xs)], title="t", xlabel="x", ylabel="y")) < 200_000
