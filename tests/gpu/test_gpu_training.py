"""On a CUDA GPU: `ft train` trains through each backend and leaves an adapter in plain PEFT format that
transformers + peft load without Unsloth; `ft eval` then generates through the same backend (Unsloth's
inference mode) where the report's dependencies (matplotlib, jsonschema) are installed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ft.manifest import cuda_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU (nox -s gpu)"),
]


def expected_fused_kernels(model_dir: Path, layers: int) -> dict[str, int]:
    """What Unsloth fuses per architecture with LoRA on all seven projections, lora_dropout 0 and a 4-bit
    base: O and the MLP on every layer; QKV only where q/k/v have no bias (Qwen2 always has one; Llama,
    Mistral and Qwen3 only with `attention_bias`)."""
    config = json.loads((model_dir / "config.json").read_text())
    qkv_bias = config["model_type"] == "qwen2" or bool(config.get("attention_bias"))
    return {"layers": layers, "qkv": 0 if qkv_bias else layers, "o": layers, "mlp": layers}


def test_ft_train_trains_a_few_steps_and_saves_a_peft_adapter(backend, small_model, tmp_path, run_ft):
    recipe = {
        "name": f"gpu-{backend}",
        "model": {"name_or_path": str(small_model), "quantization": "nf4", "dtype": "auto"},
        "train": {
            "backend": backend,
            "device": "cuda",
            "max_seq_length": 256,
            "micro_batch": "auto",
            "effective_batch": 8,
            "max_steps": 6,
            "save_every": 3,
        },
        "data": {"train": ["builtin:tickets.jsonl"], "eval_max_rows": 8},
        "eval": {"max_examples": 4, "max_new_tokens": 16, "batch_size": 4},
        "output": {"dir": "runs", "run_name": backend, "bundle_dir": "bundles"},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = run_ft("train", "--recipe", "recipe.yaml", cwd=tmp_path)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-6000:])

    run = tmp_path / "runs" / backend
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "trained" and meta["backend"] == backend and meta["device"] == "cuda"
    assert meta["train"]["steps"] == 6
    info = meta["train"]["info"]
    assert info["quantization"] == "nf4"
    # exactly the weights the recipe names (a local directory: no Hub commit)
    assert info["weights"] == {"name_or_path": str(small_model), "revision": None, "commit": None}
    if backend == "unsloth":
        assert info["unsloth"]
        # below 512 tokens Unsloth runs standard checkpointing, not its offloaded mode (models/_utils.py)
        assert info["gradient_checkpointing"] is True
        assert info["gradient_checkpointing_requested"] == "unsloth"
        # the fused LoRA kernels the layers really run: Unsloth fuses QKV only where q/k/v have no bias,
        # so never on Qwen2 (models/llama.py, patch_peft_model)
        assert info["patched"] == expected_fused_kernels(small_model, layers=2)
    choice = json.loads((run / "env.json").read_text())["run"]["micro_batch_choice"]
    assert choice["source"].startswith("auto: the largest micro-batch `ft size` predicts fits")
    assert choice["micro_batch"] * choice["grad_accum"] == 8 and choice["attempts"][-1]["outcome"] == "ok"
    assert (run / "checkpoints" / "step-000006" / "ft-checkpoint.json").is_file()

    if all(importlib.util.find_spec(m) for m in ("matplotlib", "jsonschema")):
        out = run_ft("eval", str(run), cwd=tmp_path)
        assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-6000:])
        assert json.loads((run / "eval" / "report.json").read_text())["backend"] == backend

    # plain PEFT format: the untouched base + the adapter, with transformers and peft only (no Unsloth)
    check = textwrap.dedent(
        f"""
        import sys, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(small_model)!r}, dtype=torch.float32)
        tuned = PeftModel.from_pretrained(base, {str(run / "adapter")!r})
        lora = [k for k in tuned.state_dict() if "lora_" in k]
        print(len(lora), "unsloth" in sys.modules)
        """
    )
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=Path(tmp_path))
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    n_lora, unsloth_loaded = loaded.stdout.split()
    assert int(n_lora) == 2 * 7 * 2 and unsloth_loaded == "False"  # A and B, seven projections, two layers
