"""The recipe: one typed settings tree, the single source of truth for a run.

Sources, weakest first: built-in defaults < a YAML recipe (a file, or the name of a built-in one) <
`FT_*` environment variables (nested with `__`, e.g. `FT_TRAIN__LEARNING_RATE=1e-4`) < command-line
overrides (`--set train.learning_rate=1e-4`). Unknown keys are errors with a did-you-mean suggestion.
The resolved recipe is dumped as YAML into every run together with its sha256.
"""

from __future__ import annotations

import difflib
import os
import re
from contextvars import ContextVar
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ft.errors import FtError
from ft.fsutil import sha256_bytes

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METRICS = (
    "exact_match",
    "token_f1",
    "json_valid",
    "schema_valid",
    "label_accuracy",
    "headings_match",  # ft/eval/format_checks.py: the reference's Markdown outline (house-style docs)
    "tool_call_exact",
    "tool_name_match",
    "eval_loss",
)
LOWER_IS_BETTER = {"eval_loss"}


class Section(BaseModel):
    # allow_inf_nan=False: `inf`/`nan` would pass `gt=0` checks and fail deep inside training.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSettings(Section):
    name_or_path: str = Field(
        "Qwen/Qwen2.5-0.5B-Instruct",
        description="Hugging Face Hub id or local directory of the base model. "
        "`builtin:tiny-qwen2` is a random-weight 2-layer Qwen2 built offline (tests, smoke runs).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    quantization: Literal["auto", "nf4", "none"] = Field(
        "auto",
        description="`nf4` loads the base in 4-bit (QLoRA, needs CUDA); `auto` = nf4 on CUDA, none on CPU.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Compute dtype; `auto` = bfloat16 on GPUs that support it, float16 on older ones, float32 on CPU.",
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the Hub (off: only known architectures)."
    )


class LoraSettings(Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA path (0 keeps Unsloth's fast path)."
    )
    target_modules: list[str] = Field(
        default_factory=lambda: list(ALL_PROJECTIONS),
        min_length=1,
        description="Linear layers that get adapters.",
    )


# Accelerate shards only on accelerators; on CPU processes it would quietly train plain DDP instead.
FSDP_CPU = "Accelerate shards with FSDP on GPUs only; use ddp on CPU"


class TrainSettings(Section):
    backend: Literal["auto", "unsloth", "hf"] = Field(
        "auto", description="`auto` = Unsloth on a supported CUDA GPU, else transformers+peft(+bitsandbytes)."
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="Where to train; `auto` = CUDA when present."
    )
    distributed: Literal["none", "ddp", "fsdp"] = Field(
        "none",
        description="Several processes (torchrun / accelerate launch): `ddp` replicates the base on every "
        "rank, `fsdp` shards it; `none` under a launcher with several processes means ddp. One process "
        "is never wrapped. effective_batch counts all ranks.",
    )
    max_seq_length: int = Field(2048, gt=8, description="Tokens per example after the chat template.")
    micro_batch: int | Literal["auto"] = Field(
        "auto", description="Examples per forward pass; `auto` = the largest that `ft size` predicts fits."
    )
    effective_batch: int = Field(
        16, gt=0, description="Examples per optimizer step (micro_batch x accumulation)."
    )
    packing: bool = Field(
        False,
        description="Pack several rows into each sequence of up to max_seq_length tokens (best-fit), "
        "attention kept within each row by position ids that restart per row (padding-free batches), so "
        "no compute goes to padding; micro_batch and effective_batch then count packed sequences. Use it "
        "when most rows are much shorter than max_seq_length (short answers, classification, JSON "
        "extraction): fewer, fuller steps. The per-token loss is the same as without it.",
    )

    @field_validator("micro_batch")
    @classmethod
    def _micro_batch_positive(cls, v: int | str) -> int | str:
        if v != "auto" and v < 1:
            raise ValueError("must be at least 1 (or auto)")
        return v

    epochs: float = Field(2.0, gt=0, description="Passes over the training split.")
    max_steps: int | None = Field(
        None, gt=0, description="Stop after this many optimizer steps (overrides epochs)."
    )
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the LoRA weights.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw_torch", description="8-bit optimizers need bitsandbytes and CUDA."
    )
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in backward to save memory."
    )
    assistant_only_loss: bool = Field(
        True, description="Train on assistant tokens only (prompts are masked)."
    )
    seed: int = Field(42, description="Seeds python, numpy, torch and the data order.")
    deterministic: bool = Field(
        False, description="Use deterministic kernels (slower on GPU; CPU is always so)."
    )
    save_every: int = Field(50, gt=0, description="Checkpoint every N optimizer steps.")
    keep_last: int = Field(2, gt=0, description="Complete checkpoints kept on disk.")
    log_every: int = Field(1, gt=0, description="Write metrics every N optimizer steps.")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list,
        description="Experiment trackers fed by transformers' own callbacks; offline by default: TensorBoard "
        "in RUN/tensorboard, MLflow file store in RUN/mlruns; W&B as you set it up (WANDB_MODE, ...).",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v  # `--set train.report_to=tensorboard`


class DataSettings(Section):
    train: list[str] = Field(
        default_factory=lambda: ["builtin:tickets.jsonl"],
        description="Training files (JSONL or JSON array). `builtin:NAME` = a dataset shipped with ft. "
        "`hf:ORG/NAME` = split `train` of a Hugging Face Hub dataset, read through the Hugging Face cache "
        "(offline under HF_HUB_OFFLINE=1 once cached); `hf:ORG/NAME:SPLIT` or `hf:ORG/NAME:CONFIG:SPLIT` "
        "for another split or config, `@REVISION` after the name to pin a commit (`hf:ORG/NAME@COMMIT:train`; a 7+ digit prefix of it will do).",
    )
    eval: list[str] = Field(
        default_factory=list,
        description="Held-out files or `hf:` dataset splits (as in `train`); empty = a seeded split of `train`.",
    )
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"] = Field(
        "auto", description="Row shape; `auto` detects it per row."
    )
    eval_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of rows held out when no eval file is given."
    )
    eval_max_rows: int = Field(200, gt=0, description="Cap on the held-out split size.")
    split_seed: int = Field(1234, description="Seed of the held-out split.")
    too_long: Literal["drop", "truncate", "error"] = Field(
        "drop", description="What to do with rows longer than train.max_seq_length."
    )
    max_row_chars: int = Field(
        1_000_000,
        gt=0,
        description="Longest row accepted, in characters of message content; a longer row is an error, "
        "found before anything is tokenised (~250k tokens of English: far past any context window).",
    )
    duplicates: Literal["drop", "error", "keep"] = Field(
        "drop",
        description="Rows repeating an earlier conversation exactly: drop them, refuse the data, or keep them.",
    )
    system_prompt: str | None = Field(None, description="System message added to rows that have none.")
    chat_template: str | None = Field(
        None,
        description="Chat template the rows are rendered with: null (or `tokenizer`) = the model tokenizer's "
        "own; a built-in one as its family ships it: `chatml`, `llama3` (Llama 3.1/3.3), `qwen2.5`, `gemma` "
        "(Gemma 3; a built-in's turn markers must be tokens of the model, and its end-of-turn becomes EOS); "
        "or a Jinja file path (`builtin:NAME` = shipped with ft). Its source and sha256 go into data.json; "
        "the adapter, merged model, GGUF and Modelfile carry it.",
    )

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, v: str | None) -> str | None:
        from ft.data.chat_templates import check_setting

        return check_setting(v)

    label_field: str | None = Field(
        None,
        description="JSON key of the assistant answer that holds a class label (label distribution, accuracy).",
    )
    labels: list[str] | None = Field(None, description="Declared label set; labels outside it are errors.")
    reasoning: Literal["keep", "drop"] = Field(
        "keep",
        description="An assistant turn's reasoning (a `reasoning_content`/`reasoning`/`thinking` key or "
        "part): `keep` trains on it, passed to the chat template as `reasoning_content` when the template "
        "renders that key, else written before the answer as `<think>...</think>`; `drop` removes it. Keep "
        "is the default because the rows are trained as given (dropping is a lossy choice to make on "
        "purpose); drop it to teach a model without a thinking mode the answers only.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="ft's field -> the column that holds it, for rows whose columns have other names (Hub "
        "datasets, LLaMA-Factory or axolotl files): `{messages: conversation, output: response}`. Fields: "
        "messages, conversations, instruction, input, output, system, history, prompt, completion, text, "
        "tools. Applies to every row of every file and dataset; errors name the row's own column.",
    )

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, v: dict[str, str]) -> dict[str, str]:
        from ft.data.columns import check_mapping

        return check_mapping(v)


class EvalSettings(Section):
    max_new_tokens: int = Field(128, gt=0, description="Longest generated answer per held-out prompt.")
    batch_size: int = Field(
        8,
        gt=0,
        description="Most prompts generated together (greedy, left-padded); on a GPU ft lowers it to what "
        "the sizing model predicts fits and halves it on an out-of-memory.",
    )
    max_examples: int | None = Field(None, gt=0, description="Evaluate at most this many held-out rows.")
    json_schema: dict[str, Any] | str | None = Field(
        None, description="JSON Schema (inline, or a file path / builtin:NAME) the answers must satisfy."
    )
    primary_metric: Literal[METRICS] = Field("exact_match", description="Metric the decision rule is about.")
    min_improvement: float = Field(0.05, description="KEEP needs tuned - base >= this on the primary metric.")
    guard_metrics: list[Literal[METRICS]] = Field(
        default_factory=lambda: ["json_valid"],
        description="Metrics that must not get worse by more than max_regression.",
    )
    max_regression: float = Field(0.02, ge=0, description="Largest allowed worsening of any guard metric.")
    worst_examples: int = Field(5, ge=0, description="Examples shown side by side in report.md.")
    reproduce_tolerance: float = Field(
        0.02, ge=0, description="`ft reproduce` passes when every metric is within this of the sealed one."
    )
    benchmarks: list[str] = Field(
        default_factory=list,
        description="Forgetting check: lm-evaluation-harness tasks scored on base and tuned (needs "
        "`pip install 'ft[benchmarks]'`). Each: `builtin:NAME` (shipped with ft: `builtin:ft_general_mc`), "
        "a task YAML path (relative data_files are read against its folder), or a harness task name "
        "(downloads its data). Empty: no check.",
    )
    benchmark_limit: int | None = Field(
        None, gt=0, description="Score at most this many questions per benchmark task (None: all of them)."
    )
    max_benchmark_drop: float = Field(
        0.10,
        ge=0,
        description="Largest allowed drop of a benchmark score, relative to the base's (0.10: DISCARD when "
        "a general benchmark falls by more than 10%).",
    )

    @field_validator("benchmarks", mode="before")
    @classmethod
    def _one_benchmark(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v  # `--set eval.benchmarks=builtin:ft_general_mc`

    @field_validator("benchmarks")
    @classmethod
    def _benchmarks_named(cls, v: list[str]) -> list[str]:
        if any(not s.strip() for s in v):
            raise ValueError("entries must be builtin:NAME, a task YAML path or a harness task name")
        return v


class ExportSettings(Section):
    include_data: bool = Field(False, description="Copy the data files into the bundle.")
    archive: bool = Field(True, description="Also write BUNDLE.tar.gz beside the bundle directory.")
    sign_key: str | None = Field(None, description="Ed25519 private key (PEM) to sign MANIFEST.json with.")
    formats: list[Literal["merged", "gguf", "ollama"]] = Field(
        default_factory=list,
        description="What `ft run` exports after packaging (`ft export --to`): merged safetensors, GGUF "
        "(f16 + `quantizations`), an Ollama Modelfile beside the GGUF. Empty: no export.",
    )
    quantizations: list[Literal["q8_0", "q4_k_m", "q4_0", "q5_0", "q5_k_m", "q6_k"]] = Field(
        default_factory=lambda: ["q8_0", "q4_k_m"],
        description="GGUF quantisations made from the f16 GGUF; the Modelfile uses the first (f16 if none).",
    )
    max_metric_drop: dict[Literal["16bit", "8bit", "4bit"], float] = Field(
        default_factory=lambda: {"16bit": 0.02, "8bit": 0.05, "4bit": 0.1},
        description="Largest drop of any eval metric of an export below the adapter's, per format class: "
        "16bit (merged, f16 GGUF), 8bit (q8_0), 4bit (q4_*, q5_*, q6_k); past it `ft export` fails.",
    )

    @field_validator("max_metric_drop")
    @classmethod
    def _all_classes(cls, v: dict[str, float]) -> dict[str, float]:
        return {"16bit": 0.02, "8bit": 0.05, "4bit": 0.1, **v}


class OutputSettings(Section):
    dir: str = Field("runs", description="Where run directories are created.")
    run_name: str | None = Field(None, description="Run directory name; default <recipe>-<utc time>-<hash>.")
    bundle_dir: str = Field("bundles", description="Where `ft package` writes bundles.")


class Settings(BaseSettings):
    """A resolved recipe."""

    model_config = SettingsConfigDict(
        env_prefix="FT_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
        env_ignore_empty=True,
        allow_inf_nan=False,
    )

    name: str = Field("custom", description="Name of the recipe; the run directory starts with it.")
    description: str = Field("", description="One line on what this recipe teaches the model.")
    model: ModelSettings = Field(default_factory=ModelSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)

    @field_validator("name")
    @classmethod
    def _name_is_path_safe(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\ ") or v.startswith("."):
            raise ValueError("must be a short name without spaces or slashes")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        t = self.train
        if t.micro_batch != "auto" and t.effective_batch % t.micro_batch:
            raise ValueError(
                f"train.effective_batch ({t.effective_batch}) must be a multiple of train.micro_batch ({t.micro_batch})"
            )
        if t.device == "cpu":
            if self.model.quantization == "nf4":
                raise ValueError(
                    "model.quantization: nf4 (4-bit loading) needs CUDA, but train.device is cpu"
                )
            if t.backend == "unsloth":
                raise ValueError("train.backend: unsloth needs CUDA, but train.device is cpu")
            if "8bit" in t.optimizer:
                raise ValueError(f"train.optimizer: {t.optimizer} needs CUDA, but train.device is cpu")
            if t.distributed == "fsdp":
                raise ValueError(
                    f"train.distributed: fsdp needs CUDA GPUs, but train.device is cpu ({FSDP_CPU})"
                )
        e = self.eval
        if e.primary_metric in e.guard_metrics:
            raise ValueError(f"eval.guard_metrics: {e.primary_metric!r} is already the primary metric")
        if self.data.labels is not None and not self.data.label_field:
            raise ValueError("data.labels is set but data.label_field is not")
        if e.primary_metric == "label_accuracy" and not self.data.label_field:
            raise ValueError("eval.primary_metric: label_accuracy needs data.label_field")
        if e.primary_metric == "schema_valid" and e.json_schema is None:
            raise ValueError("eval.primary_metric: schema_valid needs eval.json_schema")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Strongest first: CLI overrides, then FT_* environment, then the recipe file (defaults are last).
        recipe, cli = _LAYERS.get()
        return (_DictSource(settings_cls, cli), env_settings, _DictSource(settings_cls, recipe))

    # -- the resolved form ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        header = (
            "# ft resolved recipe: every setting, after defaults, recipe file, FT_* env and CLI overrides\n"
        )
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=100)

    @property
    def sha256(self) -> str:
        return sha256_bytes(self.to_yaml().encode("utf-8"))

    def resolved_device(self) -> str:
        if self.train.device != "auto":
            return self.train.device
        from ft.manifest import cuda_available

        return "cuda" if cuda_available() else "cpu"


# -- recipes ------------------------------------------------------------------------------------------
RECIPES_PACKAGE = "ft.recipes"


def builtin_recipes() -> dict[str, Path]:
    root = resources.files(RECIPES_PACKAGE)
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def builtin_data_path(name: str) -> Path:
    """Resolve `builtin:NAME` to the file shipped in ft/recipes/data/."""
    path = Path(str(resources.files(RECIPES_PACKAGE) / "data" / name))
    if not path.is_file():
        known = sorted(p.name for p in path.parent.iterdir())
        raise FtError(f"builtin:{name}: no such built-in file{_suggest(name, known)}")
    return path


def resolve_path(value: str, base: Path | None = None) -> Path:
    """A data/schema path from a recipe: `builtin:NAME`, absolute, or relative to the working directory."""
    if value.startswith("builtin:"):
        return builtin_data_path(value.removeprefix("builtin:"))
    p = Path(value).expanduser()
    return p


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def read_recipe(recipe: str | os.PathLike | None) -> tuple[dict[str, Any], str]:
    """Load a recipe by built-in name or path; returns (mapping, source description)."""
    if recipe is None:
        recipe = "default"
    text_path = Path(recipe)
    builtins = builtin_recipes()
    if str(recipe) in builtins:
        path, source = builtins[str(recipe)], f"builtin:{recipe}"
    elif text_path.suffix in (".yaml", ".yml") or text_path.exists():
        path, source = text_path, str(text_path)
        if text_path.is_dir():
            raise FtError(f"{text_path}: is a directory, not a recipe file")
        if not text_path.is_file():
            raise FtError(f"{text_path}: recipe file not found")
    else:
        raise FtError(
            f"recipe {str(recipe)!r}: not a file and not a built-in recipe{_suggest(str(recipe), list(builtins))}"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise FtError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FtError(f"{path}: cannot read recipe: {exc}") from None
    if not isinstance(data, dict):
        raise FtError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    data.setdefault("name", Path(path).stem)
    return data, source


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["train.learning_rate=1e-4", "lora.r=8"]` -> nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise FtError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.learning_rate=1e-4")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise FtError(f"--set {item!r}: {part} is set twice with different shapes")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """Names valid at `loc` (the parent of an offending key), for did-you-mean."""
    current: Any = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
    return list(getattr(current, "model_fields", {}))


def _has(tree: dict[str, Any], loc: tuple) -> bool:
    node: Any = tree
    for part in loc:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):  # a list item's error
            node = node[int(part)]
            continue
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _explain(exc: ValidationError, source: str, cli: dict, environ: dict[str, str]) -> FtError:
    """Turn pydantic's report into one actionable line naming where the bad value came from."""
    errors = exc.errors()
    first = errors[0]
    loc = tuple(str(p) for p in first["loc"])
    key = ".".join(loc) or "recipe"
    env_name = "FT_" + "__".join(loc).upper()
    if loc and _has(cli, loc):
        where = "--set"
    elif loc and any(k.upper() == env_name or k.upper().startswith(env_name + "__") for k in environ):
        where = f"environment {env_name}"
    else:
        where = source
    if first["type"] == "extra_forbidden":
        msg = f"{where}: {key}: unknown key{_suggest(loc[-1], _field_names(Settings, loc[:-1]))}"
    else:
        got = first.get("input")
        shown = "" if isinstance(got, dict | list) or got is None or not loc else f" (got {got!r})"
        text = first["msg"].removeprefix("Value error, ")
        if first["type"] == "literal_error" and isinstance(got, str):
            shown += _suggest(got, re.findall(r"'([^']*)'", str(first.get("ctx", {}).get("expected", ""))))
        msg = f"{where}: {key}: {text}{shown}" if loc else f"{where}: {text}"
    if len(errors) > 1:
        msg += f" [+{len(errors) - 1} more problem(s)]"
    return FtError(msg)


class _DictSource(PydanticBaseSettingsSource):
    """A settings source over a plain mapping (the recipe file, the CLI overrides)."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]):
        super().__init__(settings_cls)
        self.data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data)


_LAYERS: ContextVar[tuple[dict[str, Any], dict[str, Any]]] = ContextVar(
    "ft_settings_layers", default=({}, {})
)


def load_settings(
    recipe: str | os.PathLike | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> Settings:
    """Resolve a recipe: defaults < recipe YAML < FT_* environment < CLI overrides."""
    data, source = read_recipe(recipe)
    cli = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    token = _LAYERS.set((data, cli))
    try:
        return Settings()
    except ValidationError as exc:
        raise _explain(exc, source, cli, dict(os.environ)) from None
    finally:
        _LAYERS.reset(token)


def settings_from_dict(data: dict[str, Any], source: str = "recipe") -> Settings:
    """Validate an already-resolved recipe (e.g. a run's recipe.resolved.yaml) without reading FT_* env."""
    token = _LAYERS.set((data, {}))
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc, source, {}, {}) from None
    finally:
        _LAYERS.reset(token)


def field_docs(model: type[BaseModel] = Settings, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) for every setting: the recipe reference in README and `ft recipes`."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += field_docs(ann, f"{prefix}{name}.")
            continue
        default = field.get_default(call_default_factory=True)
        rows.append((f"{prefix}{name}", repr(default), field.description or ""))
    return rows
