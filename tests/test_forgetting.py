"""The forgetting check (eval.benchmarks): lm-evaluation-harness really runs on the tiny model, base and
tuned, on the task shipped with ft and on a user's own task YAML; the scores reach report.json and
report.md, and a planted drop turns KEEP into DISCARD through evaluate's own decision. CPU, offline."""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import pytest

from ft.data import Example
from ft.errors import FtError
from ft.eval import benchmarks
from ft.eval import evaluate as ev
from ft.eval.metrics import benchmark_check, decide

# The harness tests skip, and the rule's tests still run, where lm-eval is not installed.
needs_harness = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-eval is not installed (pip install 'ft[benchmarks]')",
)

ENV_REF = {"path": "env.json", "sha256": "0" * 64}
CAPITALS = [
    {"question": "What is the capital of Italy?", "choices": ["Rome", "Milan", "Turin"], "answer": 0},
    {"question": "What is the capital of Spain?", "choices": ["Seville", "Madrid", "Bilbao"], "answer": 1},
    {"question": "What is the capital of Egypt?", "choices": ["Luxor", "Giza", "Cairo"], "answer": 2},
    {"question": "What is the capital of Canada?", "choices": ["Ottawa", "Toronto", "Quebec"], "answer": 0},
]
USER_TASK = """\
task: capitals
dataset_path: json
dataset_kwargs: {data_files: {test: data/capitals.jsonl}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]
"""


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A freshly initialised adapter (LoRA B = 0): tuned scores equal base, so nothing has been forgotten."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(out)
    return out


@pytest.fixture
def user_task(tmp_path) -> Path:
    """A user's own task: a YAML whose data_files path is relative to the YAML's folder."""
    folder = tmp_path / "my_tasks"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "capitals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CAPITALS))
    (folder / "capitals.yaml").write_text(USER_TASK)
    return folder / "capitals.yaml"


def _examples() -> list[Example]:
    turns = [("user", "Where is my parcel?"), ("assistant", '{"category": "shipping"}')]
    return [Example([{"role": r, "content": c} for r, c in turns], "t.jsonl", i, "messages") for i in (1, 2)]


def _settings(tiny_settings, tasks: list[str]):
    # min_improvement 0: with an untrained adapter the held-out rule passes, so the benchmarks decide.
    return tiny_settings(
        **{
            "eval.benchmarks": tasks,
            "eval.benchmark_limit": 12,
            "eval.max_examples": 2,
            "eval.max_new_tokens": 4,
            "eval.min_improvement": 0.0,
            "train.device": "cpu",
        }
    )


@needs_harness
def test_harness_scores_base_and_tuned_and_a_planted_drop_discards(
    tiny_settings, adapter_dir, user_task, tmp_path, monkeypatch
):
    from ft.report import eval_report

    # report.html needs a whole run directory (run.json, ...) and has its own tests; this is about report.json.
    monkeypatch.setattr(eval_report, "write_html", lambda *args, **kwargs: None, raising=False)
    settings = _settings(tiny_settings, ["builtin:ft_general_mc", str(user_task)])
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the harness alone would read data/capitals.jsonl against this folder

    outcome = ev.evaluate(settings, adapter_dir, _examples(), device="cpu", backend="hf")
    run_dir = tmp_path / "run"
    eval_report.write_eval_outputs(run_dir, outcome.report, outcome.predictions, settings, ENV_REF)
    report = json.loads((run_dir / "eval" / "report.json").read_text())

    bench = report["benchmarks"]
    assert set(bench) == {"ft_general_mc", "capitals"}
    general, capitals = bench["ft_general_mc"], bench["capitals"]
    assert general["samples"] == 12 and capitals["samples"] == len(CAPITALS)  # limit 12 of 40; all 4
    assert general["metric"] == "acc" and capitals["source"] == str(user_task)
    for b in bench.values():
        assert 0.0 <= b["base"] <= 1.0 and b["tuned"] == b["base"] and b["ok"] is True
    assert general["files"]["ft_general_mc.jsonl"] and capitals["files"]["capitals.jsonl"]
    assert report["benchmark_harness"]["limit"] == 12
    assert report["rule"]["max_benchmark_drop"] == pytest.approx(0.10)
    assert report["decision"]["verdict"] == "KEEP"
    assert any(r.startswith("benchmark ft_general_mc acc:") for r in report["decision"]["reasons"])
    assert "| ft_general_mc | acc |" in (run_dir / "eval" / "report.md").read_text()

    # Plant a 50% drop on the tuned model's shipped-task score; evaluate's own decide must DISCARD.
    assert general["base"] > 0, "the tiny model scores 0: a drop cannot be planted on it"
    real_run = benchmarks.run

    def run_with_drop(*args, **kwargs):
        out = real_run(*args, **kwargs)
        out["tasks"]["ft_general_mc"]["tuned"] = out["tasks"]["ft_general_mc"]["base"] * 0.5
        return out

    monkeypatch.setattr(benchmarks, "run", run_with_drop)
    dropped = ev.evaluate(settings, adapter_dir, _examples(), device="cpu", backend="hf").report
    assert dropped["decision"]["verdict"] == "DISCARD"
    failing = [r for r in dropped["decision"]["reasons"] if r.endswith("FAILS")]
    assert len(failing) == 1 and failing[0].startswith("benchmark ft_general_mc acc:"), failing
    assert "-50.0%" in failing[0]
    assert dropped["benchmarks"]["ft_general_mc"]["ok"] is False
    assert dropped["benchmarks"]["capitals"]["ok"] is True


@needs_harness
def test_base_is_the_model_without_its_adapter(tiny_model_dir):
    """The adapter is off for base and on for tuned: base matches the plain model scored by the harness
    alone, and an adapter with non-zero weights moves the tuned score."""
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ft.modelref import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    config = LoraConfig(
        r=8, lora_alpha=256, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, config).eval()
    [task] = benchmarks.resolve(["builtin:ft_general_mc"])
    got = benchmarks.run(peft_model, tok, [task], limit=20, batch_size=8)["tasks"]["ft_general_mc"]
    assert got["tuned"] != got["base"]

    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    with benchmarks._quiet_harness(), tempfile.TemporaryDirectory() as tmp:
        benchmarks.write_task_yaml(task, Path(tmp))
        alone = lm_eval.simple_evaluate(
            model=HFLM(pretrained=plain, tokenizer=tok, batch_size=8),
            tasks=["ft_general_mc"],
            task_manager=TaskManager(include_path=tmp, include_defaults=False),
            limit=20,
            log_samples=False,
        )
    assert alone["results"]["ft_general_mc"]["acc,none"] == got["base"]


@pytest.mark.parametrize(
    ("base", "tuned", "higher", "ok", "rel"),
    [
        (0.60, 0.54, True, True, -0.1),  # exactly 10% relative: allowed
        (0.60, 0.53, True, False, -0.116667),
        (0.20, 0.35, True, True, 0.75),
        (10.0, 11.5, False, False, 0.15),  # perplexity-like: lower is better, a rise is the drop
        (10.0, 9.0, False, True, -0.1),
        (0.0, 0.0, True, True, None),
    ],
)
def test_relative_drop_rule(base, tuned, higher, ok, rel):
    got = benchmark_check({"metric": "m", "base": base, "tuned": tuned, "higher_is_better": higher}, 0.10)
    assert got["ok"] is ok
    assert got["relative_change"] == (None if rel is None else pytest.approx(rel, abs=1e-6))


def test_decide_names_the_failing_task(tiny_settings):
    e = tiny_settings(**{"eval.min_improvement": 0.0}).eval
    metrics = {m: 0.5 for m in [e.primary_metric, *e.guard_metrics]}  # held-out rule: unchanged, passes
    scores = {
        "arith": {"metric": "acc", "base": 0.8, "tuned": 0.6},
        "trivia": {"metric": "acc_norm", "base": 0.5, "tuned": 0.5},
    }
    d = decide(metrics, metrics, e, scores)
    assert d.verdict == "DISCARD"
    assert [r for r in d.reasons if "FAILS" in r] == [
        "benchmark arith acc: base 0.8000 -> tuned 0.6000 (-25.0%, may drop by at most 10% relative) FAILS"
    ]
    assert d.benchmarks["trivia"]["ok"] is True and "benchmarks" not in d.to_dict()
    assert decide(metrics, metrics, e, {"trivia": scores["trivia"]}).verdict == "KEEP"


def test_benchmarks_setting_accepts_one_name(tiny_settings):
    s = tiny_settings(**{"eval.benchmarks": "builtin:ft_general_mc"})
    assert s.eval.benchmarks == ["builtin:ft_general_mc"] and s.eval.max_benchmark_drop == 0.10


@needs_harness
def test_bad_entries_are_errors_before_any_model_loads(tmp_path, user_task):
    with pytest.raises(FtError, match="no such built-in task; did you mean 'ft_general_mc'"):
        benchmarks.resolve(["builtin:ft_general"])
    with pytest.raises(FtError, match="missing.yaml: task file not found"):
        benchmarks.resolve([str(tmp_path / "missing.yaml")])
    (tmp_path / "nameless.yaml").write_text("dataset_path: json\n")
    with pytest.raises(FtError, match=r"nameless.yaml: needs `task: NAME`"):
        benchmarks.resolve([str(tmp_path / "nameless.yaml")])
    with pytest.raises(FtError, match="both define task 'capitals'"):
        benchmarks.resolve([str(user_task), str(user_task)])
    (user_task.parent / "data" / "capitals.jsonl").unlink()
    [task] = benchmarks.resolve([str(user_task)])
    with pytest.raises(FtError, match="capitals.jsonl not found"):
        benchmarks.write_task_yaml(task, tmp_path)


def test_missing_harness_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(FtError, match="needs lm-evaluation-harness") as info:
        benchmarks.resolve(["builtin:ft_general_mc"])
    assert "ft[benchmarks]" in (info.value.hint or "")
