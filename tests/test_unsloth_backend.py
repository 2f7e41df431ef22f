"""The Unsloth backend on CPU: nothing imports unsloth without CUDA, the import-order guard, and how a
recipe maps onto FastLanguageModel (against a fake `unsloth` module that records its calls)."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from ft.errors import FtError

ROOT = Path(__file__).resolve().parents[1]


def run_py(code: str, *, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env_path = [str(ROOT)] + ([str(pythonpath)] if pythonpath else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(env_path)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env
    )


@pytest.fixture
def fake_unsloth_pkg(tmp_path: Path) -> Path:
    """A directory with an `unsloth` package that records that it was imported and what was loaded first."""
    pkg = tmp_path / "site" / "unsloth"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "import sys\nIMPORTED_AFTER = sorted(m for m in ('transformers', 'trl', 'peft') if m in sys.modules)\n"
    )
    return tmp_path / "site"


def test_importing_the_backend_module_does_not_import_unsloth(fake_unsloth_pkg):
    out = run_py(
        """
        import sys
        import ft.backends.unsloth as b
        from ft import backends
        backends.get("unsloth")
        print("unsloth" in sys.modules, "torch" in sys.modules, "transformers" in sys.modules)
        """,
        pythonpath=fake_unsloth_pkg,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "False"]


def test_no_cuda_means_no_unsloth_import(fake_unsloth_pkg):
    out = run_py(
        """
        import sys
        import ft.manifest
        ft.manifest.cuda_available = lambda: False
        from ft.backends.unsloth import import_unsloth
        from ft.errors import FtError
        try:
            import_unsloth()
        except FtError as e:
            print("FtError:", e)
        print("imported:", "unsloth" in sys.modules)
        """,
        pythonpath=fake_unsloth_pkg,
    )
    assert out.returncode == 0, out.stderr
    assert "FtError: train.backend: unsloth needs a CUDA GPU" in out.stdout
    assert "imported: False" in out.stdout


def test_import_order_guard_refuses_after_transformers(fake_unsloth_pkg):
    out = run_py(
        """
        import sys
        import ft.manifest
        ft.manifest.cuda_available = lambda: True
        import transformers  # loaded first: Unsloth's patches would not apply
        from ft.backends.unsloth import import_unsloth
        from ft.errors import FtError
        try:
            import_unsloth()
        except FtError as e:
            print("FtError:", e)
        print("imported:", "unsloth" in sys.modules)
        """,
        pythonpath=fake_unsloth_pkg,
    )
    assert out.returncode == 0, out.stderr
    assert "must be imported before transformers, trl, peft" in out.stdout
    assert "transformers is already loaded" in out.stdout
    assert "import_unsloth()" in out.stdout  # says how to fix it
    assert "imported: False" in out.stdout


def test_import_first_succeeds_and_later_imports_are_fine(fake_unsloth_pkg):
    out = run_py(
        """
        import sys
        import ft.manifest
        ft.manifest.cuda_available = lambda: True
        from ft.backends.unsloth import import_unsloth
        mod = import_unsloth()
        print("first:", mod.IMPORTED_AFTER)
        import transformers  # after Unsloth: fine, and import_unsloth stays idempotent
        print("again:", import_unsloth() is mod)
        """,
        pythonpath=fake_unsloth_pkg,
    )
    assert out.returncode == 0, out.stderr
    assert "first: []" in out.stdout and "again: True" in out.stdout


def test_prepare_imports_unsloth_before_the_data_check_loads_transformers(fake_unsloth_pkg):
    """What `ft train` must do first: choose the backend from config.json (no transformers) and import
    Unsloth then, so that the tokenizer the data check loads comes after it."""
    out = run_py(
        """
        import sys
        import ft.manifest
        ft.manifest.cuda_available = lambda: True
        from ft import backends
        from ft.config import load_settings
        s = load_settings("tiny", {"train": {"device": "cuda", "backend": "auto"}})
        print("before:", "transformers" in sys.modules, "unsloth" in sys.modules)
        print("chose:", backends.prepare(s))
        import unsloth
        print("unsloth saw first:", unsloth.IMPORTED_AFTER)
        from ft.modelref import load_tokenizer  # the data check's tokenizer
        load_tokenizer("builtin:tiny-qwen2")
        from ft.backends.unsloth import import_unsloth
        print("later:", import_unsloth() is unsloth)
        """,
        pythonpath=fake_unsloth_pkg,
    )
    assert out.returncode == 0, out.stderr
    assert "before: False False" in out.stdout
    assert "chose: ('cuda', 'unsloth', 'auto: CUDA GPU and a supported architecture (qwen2)')" in out.stdout
    assert "unsloth saw first: []" in out.stdout and "later: True" in out.stdout


def test_prepare_picks_hf_without_cuda_or_for_an_unsupported_architecture(fake_unsloth_pkg, tmp_path):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    out = run_py(
        f"""
        import sys
        import ft.manifest
        from ft import backends
        from ft.config import load_settings
        ft.manifest.cuda_available = lambda: False
        print("cpu:", backends.prepare(load_settings("tiny", {{"train": {{"device": "auto", "backend": "auto"}}}})))
        ft.manifest.cuda_available = lambda: True
        s = load_settings(
            "tiny", {{"train": {{"device": "cuda", "backend": "auto"}}, "model": {{"name_or_path": {str(gpt2)!r}}}}}
        )
        print("gpt2:", backends.prepare(s))
        print("recorded:", backends.prepare(s, backend="hf"))
        print("imported:", "unsloth" in sys.modules, "transformers" in sys.modules)
        """,
        pythonpath=fake_unsloth_pkg,
    )
    assert out.returncode == 0, out.stderr
    assert "cpu: ('cpu', 'hf', 'auto: no CUDA GPU, Unsloth needs one')" in out.stdout
    assert "gpt2: ('cuda', 'hf', \"auto: Unsloth does not support the 'gpt2' architecture\")" in out.stdout
    assert "recorded: ('cuda', 'hf', 'recorded (hf)')" in out.stdout
    assert "imported: False False" in out.stdout


def test_model_type_without_transformers(tmp_path, monkeypatch):
    from ft.backends import model_type_of

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps({"model_type": "llava", "text_config": {"model_type": "llama"}})
    )
    assert model_type_of(str(d)) == "llava"
    (d / "config.json").write_text(json.dumps({"text_config": {"model_type": "llama"}}))
    assert model_type_of(str(d)) == "llama"
    assert model_type_of("builtin:tiny-qwen2") == "qwen2"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert model_type_of("nobody/not-cached-anywhere") is None  # offline and not cached: unknown


def test_device_must_be_cuda(tiny_settings):
    from ft.backends import unsloth

    s = tiny_settings()
    with pytest.raises(FtError, match="needs a CUDA GPU"):
        unsloth.load_for_training(s, "cpu")
    with pytest.raises(FtError, match="needs a CUDA GPU"):
        unsloth.load_for_eval(s, "adapter", "cpu")


# -- the recipe -> FastLanguageModel mapping, against a fake at Unsloth's real signatures ------------------
# unsloth 2026.10.5: FastLanguageModel.from_pretrained (models/loader.py), FastLlamaModel.get_peft_model and
# patch_peft_model (models/llama.py), apply_unsloth_gradient_checkpointing (models/_utils.py), the name
# mapper (models/mapper.py, loader_utils.get_model_name). The fake does what ft depends on: swaps a mapped
# Hub id for Unsloth's pre-quantised repo and drops `revision` unless use_exact_model_name; falls back from
# "unsloth" to standard checkpointing below 512 tokens; fuses a layer's QKV / O / MLP LoRA only where the
# projections are all adapted and bias-free, with lora_dropout 0 and bias "none".
MAPPED = {"qwen/qwen2.5-0.5b-instruct": "unsloth/Qwen2.5-0.5B-Instruct-bnb-4bit"}
MLP, ATTN = ("gate_proj", "up_proj", "down_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")


def _proj(bias: bool):
    return types.SimpleNamespace(bias=object() if bias else None)


def original_apply_qkv(self, X):  # Unsloth's unfused defaults (llama.py)
    pass


def original_apply_o(self, X):
    pass


def apply_lora_qkv(self, X):  # its fused kernels (kernels/fast_lora.py)
    pass


def apply_lora_o(self, X):
    pass


def apply_lora_mlp_swiglu(self, X):
    pass


class FakeModel:
    """A decoder of `layers` layers; Qwen2's q/k/v carry a bias, Llama's do not."""

    def __init__(self, name: str, revision: str | None, arch: str = "qwen2", layers: int = 2, max_seq=2048):
        import torch

        self.config = types.SimpleNamespace(
            dtype=torch.bfloat16,
            model_type=arch,
            _name_or_path=name,
            _commit_hash=hashlib.sha1(f"{name}@{revision or 'main'}".encode()).hexdigest(),
        )
        self.max_seq_length = max_seq
        qkv_bias = arch == "qwen2"
        self.model = types.SimpleNamespace(layers=[])
        for _ in range(layers):
            attn = types.SimpleNamespace(apply_qkv=original_apply_qkv, apply_o=original_apply_o)
            for n in ATTN:
                setattr(attn, n, _proj(qkv_bias and n != "o_proj"))
            mlp = types.SimpleNamespace(forward=lambda X: X, **{n: _proj(False) for n in MLP})
            self.model.layers.append(types.SimpleNamespace(self_attn=attn, mlp=mlp))

    def get_nb_trainable_parameters(self):
        return 123, 4567


def unsloth_from_pretrained(  # FastLanguageModel.from_pretrained's signature, unsloth 2026.10.5
    model_name="unsloth/Llama-3.2-1B-Instruct",
    max_seq_length=2048,
    dtype=None,
    load_in_4bit=True,
    load_in_8bit=False,
    load_in_16bit=False,
    full_finetuning=False,
    token=None,
    device_map="sequential",
    device_map_planner_kwargs=None,
    rope_scaling=None,
    fix_tokenizer=True,
    trust_remote_code=False,
    use_gradient_checkpointing="unsloth",
    resize_model_vocab=None,
    revision=None,
    use_exact_model_name=False,
    offload_embedding=None,
    float32_mixed_precision=None,
    fast_inference=False,
    gpu_memory_utilization=0.5,
    float8_kv_cache=False,
    random_state=3407,
    max_lora_rank=64,
    disable_log_stats=True,
    qat_scheme=None,
    load_in_fp8=False,
    unsloth_tiled_mlp=False,
    text_only=False,
    *args,
    on_model_resolved=None,
    **kwargs,
): ...


def unsloth_get_peft_model(  # FastLlamaModel.get_peft_model's signature, unsloth 2026.10.5
    model,
    r=16,
    target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    lora_alpha=16,
    lora_dropout=0.0,
    bias="none",
    layers_to_transform=None,
    layers_pattern=None,
    finetune_last_n_layers=None,
    use_gradient_checkpointing="unsloth",
    random_state=3407,
    max_seq_length=2048,
    use_rslora=False,
    modules_to_save=None,
    init_lora_weights=True,
    loftq_config={},  # noqa: B006 - Unsloth's own default
    temporary_location="_unsloth_temporary_saved_buffers",
    qat_scheme=None,
    target_parameters=None,
    ensure_weight_tying=None,
    offload_layers=None,
    checkpoint_skip_layers=0,
    **kwargs,
): ...


def bind(signature_of, args, kw) -> dict:
    """The call's arguments with defaults; anything ft passes must be one of Unsloth's own parameters
    (the rest would travel on through **kwargs to transformers or PEFT)."""
    bound = inspect.signature(signature_of).bind(*args, **kw)
    assert not bound.arguments.get("args") and not bound.arguments.get("kwargs"), bound.arguments
    bound.apply_defaults()
    return dict(bound.arguments)


def make_fast(calls: dict, arch: str = "qwen2", honour_exact_name: bool = True):
    class FastLanguageModel:
        @staticmethod
        def from_pretrained(*args, **kw):
            a = bind(unsloth_from_pretrained, args, kw)
            calls["from_pretrained"] = kw
            name, revision = a["model_name"], a["revision"]
            exact = a["use_exact_model_name"] and honour_exact_name
            if not exact and name.lower() in MAPPED and a["load_in_4bit"]:
                name, revision = MAPPED[name.lower()], None  # loader.py: _revision_for_resolved_repo
            return FakeModel(name, revision, arch, max_seq=a["max_seq_length"]), object()

        @staticmethod
        def get_peft_model(*args, **kw):
            a = bind(unsloth_get_peft_model, args, kw)
            calls["get_peft_model"] = kw
            model = a["model"]
            gc = a["use_gradient_checkpointing"]
            if gc == "unsloth" and getattr(model, "max_seq_length", 512) < 512:
                gc = True  # apply_unsloth_gradient_checkpointing
            model._unsloth_gradient_checkpointing = gc  # patch_peft_model records the effective mode
            for layer in model.model.layers:
                for part, names in ((layer.self_attn, ATTN), (layer.mlp, MLP)):
                    for n in names:
                        if n in a["target_modules"]:
                            getattr(part, n).lora_A = {}

                def fusable(part, names):
                    return all(
                        hasattr(getattr(part, n), "lora_A") and getattr(part, n).bias is None for n in names
                    )

                if a["lora_dropout"] == 0 and a["bias"] == "none":
                    if fusable(layer.mlp, MLP):
                        layer.mlp.forward = types.MethodType(apply_lora_mlp_swiglu, layer.mlp)
                    if fusable(layer.self_attn, ATTN[:3]):
                        layer.self_attn.apply_qkv = apply_lora_qkv
                    if fusable(layer.self_attn, ATTN[3:]):
                        layer.self_attn.apply_o = apply_lora_o
            return model

        @staticmethod
        def for_inference(model):
            calls["for_inference"] = model

    return FastLanguageModel


@pytest.fixture
def fake_unsloth(monkeypatch):
    """fake_unsloth(arch=..., honour_exact_name=...) -> the calls the fake FastLanguageModel recorded."""

    def install(**kw) -> dict:
        calls: dict = {}
        fake = types.ModuleType("unsloth")
        fake.FastLanguageModel = make_fast(calls, **kw)
        monkeypatch.setitem(sys.modules, "unsloth", fake)
        return calls

    return install


@pytest.fixture
def fake_fast(fake_unsloth):
    return fake_unsloth()


def test_training_load_maps_the_recipe(tiny_settings, fake_fast):
    from ft.backends import unsloth

    s = tiny_settings(
        **{
            "model.quantization": "auto",
            "model.dtype": "auto",
            "train.device": "auto",
            "train.backend": "unsloth",
            "train.max_seq_length": 512,
            "train.gradient_checkpointing": True,
            "train.seed": 7,
            "lora.r": 8,
            "lora.alpha": 16,
            "lora.target_modules": ["q_proj", "v_proj"],
        }
    )
    loaded = unsloth.load_for_training(s, "cuda")
    fp = fake_fast["from_pretrained"]
    assert fp["load_in_4bit"] is True and fp["dtype"] is None and fp["max_seq_length"] == 512
    assert Path(fp["model_name"]).is_dir()  # builtin:tiny-qwen2 resolved to its local directory
    assert fp["use_gradient_checkpointing"] == "unsloth"
    peft = fake_fast["get_peft_model"]
    assert peft["r"] == 8 and peft["lora_alpha"] == 16 and peft["lora_dropout"] == 0.0
    assert peft["target_modules"] == ["q_proj", "v_proj"] and peft["bias"] == "none"
    assert peft["use_gradient_checkpointing"] == "unsloth" and peft["random_state"] == 7
    assert loaded.backend == "unsloth" and loaded.quantization == "nf4" and loaded.dtype == "bfloat16"
    assert loaded.info["trainable_params"] == 123
    # only q and v adapted (and Qwen2's q/k/v have a bias): no fused kernel runs; the record says why
    assert loaded.info["patched"] == {"layers": 2, "qkv": 0, "o": 0, "mlp": 0}
    assert loaded.info["not_fused"]["qkv"] == "no LoRA adapter on k_proj (lora.target_modules)"
    assert fp["use_exact_model_name"] is True and loaded.info["gradient_checkpointing"] == "unsloth"
    assert "unsloth" in loaded.info and "unsloth_zoo" in loaded.info
    assert loaded.tokenizer.chat_template  # ft's tokenizer, as the data was encoded with it


def test_no_checkpointing_and_16_bit_map_through(tiny_settings, fake_fast):
    from ft.backends import unsloth

    s = tiny_settings(
        **{
            "model.quantization": "none",
            "model.dtype": "bfloat16",
            "train.device": "auto",
            "train.backend": "unsloth",
            "train.gradient_checkpointing": False,
        }
    )
    import torch

    loaded = unsloth.load_for_training(s, "cuda")
    assert fake_fast["from_pretrained"]["load_in_4bit"] is False
    assert fake_fast["from_pretrained"]["dtype"] is torch.bfloat16
    assert fake_fast["get_peft_model"]["use_gradient_checkpointing"] is False
    assert loaded.quantization == "none"
    # the trainer must not turn checkpointing on behind Unsloth's back ...
    assert unsloth.sft_config_overrides(s) == {
        "gradient_checkpointing": False,
        "gradient_checkpointing_kwargs": None,
    }


def test_sft_config_keeps_unsloths_checkpointing_on(tiny_settings):
    """... nor off: Unsloth's trainer calls model.for_training(use_gradient_checkpointing=args.
    gradient_checkpointing), and its offloaded checkpointing runs on the reentrant path (no kwargs)."""
    from ft.backends import unsloth

    s = tiny_settings(**{"train.device": "auto", "train.gradient_checkpointing": True})
    assert unsloth.sft_config_overrides(s) == {
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": None,
    }


def test_eval_load_uses_inference_mode(tiny_settings, fake_fast, monkeypatch):
    from ft.backends import unsloth

    loaded_adapters = []

    class FakePeft:
        @staticmethod
        def from_pretrained(model, path, is_trainable):
            loaded_adapters.append((path, is_trainable))
            return model

    monkeypatch.setattr("peft.PeftModel", FakePeft)
    s = tiny_settings(**{"model.quantization": "auto", "train.device": "auto", "train.backend": "unsloth"})
    loaded = unsloth.load_for_eval(s, "/runs/x/adapter", "cuda")
    assert loaded_adapters == [("/runs/x/adapter", False)]
    assert fake_fast["for_inference"] is loaded.model
    assert "use_gradient_checkpointing" not in fake_fast["from_pretrained"]


def test_trainer_class_is_trls_with_unsloths_checkpointing_settings(fake_fast):
    from trl import SFTTrainer

    from ft.backends import unsloth

    cls = unsloth.trainer_class()
    assert issubclass(cls, SFTTrainer) and unsloth.trainer_class() is cls


HUB = "Qwen/Qwen2.5-0.5B-Instruct"  # in Unsloth's mapper: unsloth/Qwen2.5-0.5B-Instruct-bnb-4bit


@pytest.fixture
def hub_settings(tiny_settings, monkeypatch, tiny_tokenizer):
    """Settings for a Hub model on Unsloth (4-bit, all seven projections); the tokenizer stays offline."""
    monkeypatch.setattr("ft.modelref.load_tokenizer", lambda *a, **k: tiny_tokenizer)

    def make(**overrides):
        base = {
            "model.name_or_path": HUB,
            "model.revision": "7ae557604adf67be50417f59c2c2f167def9a775",
            "model.quantization": "nf4",
            "train.backend": "unsloth",
            "train.device": "auto",
            "train.max_seq_length": 1024,
            "train.gradient_checkpointing": True,
            "lora.target_modules": [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        }
        return tiny_settings(**{**base, **overrides})

    return make


def test_unsloth_loads_exactly_the_named_repo_and_revision(hub_settings, fake_unsloth, monkeypatch):
    """Issue 8.2: without use_exact_model_name Unsloth trains its own pre-quantised repo and drops the pin."""
    from ft.backends import unsloth

    calls = fake_unsloth()
    s = hub_settings()
    loaded = unsloth.load_for_training(s, "cuda")
    fp = calls["from_pretrained"]
    assert (fp["model_name"], fp["revision"], fp["use_exact_model_name"]) == (HUB, s.model.revision, True)
    commit = hashlib.sha1(f"{HUB}@{s.model.revision}".encode()).hexdigest()  # what the fake resolves to
    assert loaded.info["weights"] == {"name_or_path": HUB, "revision": s.model.revision, "commit": commit}

    monkeypatch.setattr("peft.PeftModel.from_pretrained", lambda model, *a, **k: model)
    evaluated = unsloth.load_for_eval(s, "adapter", "cuda")
    assert calls["from_pretrained"]["use_exact_model_name"] is True
    assert evaluated.info["weights"] == loaded.info["weights"]


def test_unsloth_loading_another_repo_is_refused(hub_settings, fake_unsloth):
    """An Unsloth that swaps the repo anyway (a future version ignoring the flag) does not train silently."""
    from ft.backends import unsloth

    fake_unsloth(honour_exact_name=False)
    with pytest.raises(FtError, match="Unsloth loaded 'unsloth/Qwen2.5-0.5B-Instruct-bnb-4bit' instead of"):
        unsloth.load_for_training(hub_settings(), "cuda")


@pytest.mark.parametrize("seq, effective", [(256, True), (511, True), (512, "unsloth"), (2048, "unsloth")])
def test_the_checkpointing_unsloth_really_applies_is_recorded(hub_settings, fake_unsloth, seq, effective):
    """Issue 8.5: below 512 tokens Unsloth runs standard checkpointing, not its offloaded "unsloth" mode."""
    from ft.backends import unsloth

    calls = fake_unsloth()
    loaded = unsloth.load_for_training(hub_settings(**{"train.max_seq_length": seq}), "cuda")
    assert calls["get_peft_model"]["use_gradient_checkpointing"] == "unsloth"  # what ft asks for
    assert loaded.info["gradient_checkpointing"] == effective
    assert loaded.info.get("gradient_checkpointing_requested") == (
        None if effective == "unsloth" else "unsloth"
    )


@pytest.mark.parametrize(
    "arch, patched, not_fused",
    [
        ("qwen2", {"layers": 2, "qkv": 0, "o": 2, "mlp": 2}, {"qkv": "q_proj, k_proj, v_proj have a bias"}),
        ("llama", {"layers": 2, "qkv": 2, "o": 2, "mlp": 2}, {}),
    ],
)
def test_fused_kernels_are_read_from_the_model_per_architecture(
    hub_settings, fake_unsloth, arch, patched, not_fused
):
    """Issue 8.5: Unsloth fuses QKV only where q/k/v have no bias, so never on Qwen2 (its log line counts
    them anyway); the record counts what the layers really run."""
    from ft.backends import unsloth

    fake_unsloth(arch=arch)
    loaded = unsloth.load_for_training(hub_settings(), "cuda")
    assert loaded.info["patched"] == patched
    got = {k: v.split(";")[0] for k, v in loaded.info.get("not_fused", {}).items()}
    assert got == not_fused


def test_lora_dropout_keeps_every_kernel_unfused_and_says_so(hub_settings, fake_unsloth):
    from ft.backends import unsloth

    fake_unsloth(arch="llama")
    loaded = unsloth.load_for_training(hub_settings(**{"lora.dropout": 0.05}), "cuda")
    assert loaded.info["patched"] == {"layers": 2, "qkv": 0, "o": 0, "mlp": 0}
    assert set(loaded.info["not_fused"].values()) == {"lora.dropout > 0"}


def test_import_refuses_after_cuda_was_initialised(fake_unsloth_pkg):
    """Unsloth's import sets PYTORCH_ALLOC_CONF=expandable_segments:True (unsloth_zoo/__init__.py), which
    torch reads only when it initialises CUDA: imported later, the setting is silently lost."""
    out = run_py(
        """
        import sys, torch
        import ft.manifest
        ft.manifest.cuda_available = lambda: True
        torch.cuda.is_initialized = lambda: True  # as after torch.cuda.get_device_properties(0) on a GPU
        from ft.backends.unsloth import import_unsloth
        from ft.errors import FtError
        try:
            import_unsloth()
        except FtError as e:
            print("FtError:", e)
        print("imported:", "unsloth" in sys.modules)
        """,
        pythonpath=fake_unsloth_pkg,
    )
    assert out.returncode == 0, out.stderr
    assert "must be imported before CUDA is initialised" in out.stdout
    assert "PYTORCH_ALLOC_CONF" in out.stdout and "imported: False" in out.stdout


# -- `ft train`'s real path (ft.train.train) through the unsloth backend, on CPU ----------------------------
@pytest.fixture
def peft_backed_fast(monkeypatch):
    """A fake `unsloth` whose FastLanguageModel loads the model with transformers and wraps it with real peft
    (as Unsloth does underneath), recording the calls in order."""
    calls: list[tuple[str, dict]] = []

    class FastLanguageModel:
        @staticmethod
        def from_pretrained(**kw):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            calls.append(("from_pretrained", kw))
            model = AutoModelForCausalLM.from_pretrained(kw["model_name"], dtype=kw["dtype"])
            return model, AutoTokenizer.from_pretrained(kw["model_name"])

        @staticmethod
        def get_peft_model(model, **kw):
            from peft import LoraConfig, get_peft_model

            calls.append(("get_peft_model", kw))
            model.enable_input_require_grads()  # Unsloth does this for checkpointing through a frozen base
            config = LoraConfig(
                r=kw["r"],
                lora_alpha=kw["lora_alpha"],
                lora_dropout=kw["lora_dropout"],
                target_modules=kw["target_modules"],
                bias=kw["bias"],
                task_type="CAUSAL_LM",
            )
            return get_peft_model(model, config)

    fake = types.ModuleType("unsloth")
    fake.FastLanguageModel = FastLanguageModel
    monkeypatch.setitem(sys.modules, "unsloth", fake)
    return calls


def test_ft_train_on_the_unsloth_backend_saves_a_peft_adapter(
    tiny_settings, tiny_model_dir, tmp_path, monkeypatch, peft_backed_fast
):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, TrainerCallback

    from ft import train as training

    seen_args = {}

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            seen_args.update(
                gradient_checkpointing=args.gradient_checkpointing, kwargs=args.gradient_checkpointing_kwargs
            )

    original = training._callbacks
    monkeypatch.setattr(training, "_callbacks", lambda run_dir, hint: original(run_dir, hint) + [Record()])
    s = tiny_settings(
        **{
            "train.device": "auto",
            "train.backend": "unsloth",
            "train.max_seq_length": 64,
            "train.gradient_checkpointing": True,
            "train.max_steps": 2,
            "train.save_every": 1,
            "train.effective_batch": 4,
            "train.micro_batch": 2,
        }
    )
    rng = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": ids, "labels": ids} for ids in torch.randint(0, 500, (8, 48), generator=rng).tolist()
    ]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = training.train(
        s,
        run_dir,
        rows,
        [],
        data_sha256="x",
        device="cuda",
        backend="unsloth",
        backend_reason="test",
        micro_batch=2,
    )

    # the recipe reached Unsloth's API, in Unsloth's order
    assert [name for name, _ in peft_backed_fast] == ["from_pretrained", "get_peft_model"]
    fp, gp = peft_backed_fast[0][1], peft_backed_fast[1][1]
    assert fp["model_name"] == str(tiny_model_dir) and fp["max_seq_length"] == 64
    assert fp["load_in_4bit"] is False and fp["dtype"] is torch.float32  # the tiny recipe: quantization none
    assert fp["use_gradient_checkpointing"] == gp["use_gradient_checkpointing"] == "unsloth"
    assert (gp["r"], gp["lora_alpha"], gp["random_state"]) == (16, 32, 42)
    # the trainer ran with Unsloth's checkpointing settings, not the hf backend's use_reentrant=False
    assert seen_args == {"gradient_checkpointing": True, "kwargs": None}
    assert (result.backend, result.micro_batch, result.grad_accum, result.steps) == ("unsloth", 2, 2, 2)
    assert (run_dir / "checkpoints" / "step-000002" / "ft-checkpoint.json").is_file()

    # the adapter on disk is plain PEFT format: loads onto the untouched base with peft alone
    adapter = result.adapter_dir
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16 and config["lora_alpha"] == 32
    assert set(config["target_modules"]) == set(s.lora.target_modules)
    saved = load_file(adapter / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())  # trained (B starts at zero)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, str(adapter))
    state = {k: v for k, v in tuned.state_dict().items() if "lora_" in k}
    assert len(state) == len(saved)
