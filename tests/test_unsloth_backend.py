"""The Unsloth backend on CPU: nothing imports unsloth without CUDA, the import-order guard, and how a
recipe maps onto FastLanguageModel (against a fake `unsloth` module that records its calls)."""

from __future__ import annotations

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


def test_device_must_be_cuda(tiny_settings):
    from ft.backends import unsloth

    s = tiny_settings()
    with pytest.raises(FtError, match="needs a CUDA GPU"):
        unsloth.load_for_training(s, "cpu")
    with pytest.raises(FtError, match="needs a CUDA GPU"):
        unsloth.load_for_eval(s, "adapter", "cpu")


# -- the recipe -> FastLanguageModel mapping, against a recording fake ------------------------------
class FakeModel:
    def __init__(self):
        import torch

        self.config = types.SimpleNamespace(dtype=torch.bfloat16)
        attn = types.SimpleNamespace(apply_qkv=None, apply_o=None)
        mlp = types.SimpleNamespace(forward=lambda *a: None)
        self.model = types.SimpleNamespace(layers=[types.SimpleNamespace(self_attn=attn, mlp=mlp)])

    def get_nb_trainable_parameters(self):
        return 123, 4567


@pytest.fixture
def fake_fast(monkeypatch):
    calls: dict = {}

    def apply_lora_qkv():  # Unsloth's names for its fused LoRA paths
        pass

    class FastLanguageModel:
        @staticmethod
        def from_pretrained(**kw):
            calls["from_pretrained"] = kw
            return FakeModel(), object()

        @staticmethod
        def get_peft_model(model, **kw):
            calls["get_peft_model"] = kw
            model.model.layers[0].self_attn.apply_qkv = apply_lora_qkv
            return model

        @staticmethod
        def for_inference(model):
            calls["for_inference"] = model

    fake = types.ModuleType("unsloth")
    fake.FastLanguageModel = FastLanguageModel
    monkeypatch.setitem(sys.modules, "unsloth", fake)
    return calls


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
    assert loaded.info["patched"] == {"layers": 1, "qkv": 1, "o": 0, "mlp": 0}
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
    assert unsloth.sft_config_overrides(s) == {
        "gradient_checkpointing": False,
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


def test_trainer_class_is_trls(fake_fast):
    from trl import SFTTrainer

    from ft.backends import unsloth

    assert unsloth.trainer_class() is SFTTrainer
