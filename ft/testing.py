"""A tiny model and dataset made offline, for tests, the `tiny` recipe and smoke runs.

The model is a real architecture (Qwen2) shrunk to 2 layers of width 64 with random weights, and its
tokenizer is a byte-level BPE trained on the spot with the `tokenizers` library, so nothing is ever
downloaded. The dataset is a strict-JSON extraction task whose answers are in the prompt, so even this
model learns it in seconds and the tuned-vs-base comparison is meaningful.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from ft.errors import FtError

TINY_MODEL = "builtin:tiny-qwen2"
TINY_SEED = 0

# A ChatML template like Qwen's, so the tiny model exercises the same code paths as the real default.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

SYSTEM_PROMPT = 'Reply with one JSON object: {"name", "city", "category"}.'
NAMES = [
    "Alice",
    "Bruno",
    "Chen",
    "Dara",
    "Emeka",
    "Fatima",
    "Goran",
    "Hana",
    "Ivan",
    "Jonas",
    "Kemal",
    "Lena",
    "Mateo",
    "Nadia",
    "Omar",
    "Priya",
    "Quentin",
    "Rosa",
    "Sven",
    "Tariq",
    "Uma",
    "Viktor",
    "Wei",
    "Yara",
]
CITIES = [
    "Paris",
    "Lagos",
    "Osaka",
    "Lima",
    "Oslo",
    "Cairo",
    "Quito",
    "Porto",
    "Delhi",
    "Perth",
    "Riga",
    "Seoul",
    "Tunis",
    "Basel",
    "Cork",
    "Dakar",
    "Graz",
    "Hanoi",
    "Kyiv",
    "Malmo",
]
# Each category has its own phrasing, so the label is learnable from the text.
CATEGORIES = {
    "billing": [
        "I was charged twice this month",
        "my invoice shows the wrong amount",
        "please refund my payment",
    ],
    "shipping": ["my parcel has not arrived", "the package came damaged", "the delivery is two weeks late"],
    "account": ["I cannot log in to my account", "please reset my password", "my profile was locked"],
    "technical": [
        "the app crashes on start",
        "the sync fails with an error",
        "the export button does nothing",
    ],
}
LABELS = list(CATEGORIES)
TICKET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "city": {"type": "string"},
        "category": {"type": "string", "enum": LABELS},
    },
    "required": ["name", "city", "category"],
    "additionalProperties": False,
}


def ticket_row(rng: random.Random) -> dict[str, Any]:
    name, city = rng.choice(NAMES), rng.choice(CITIES)
    category = rng.choice(LABELS)
    complaint = rng.choice(CATEGORIES[category])
    prompt = f"From {name} in {city}: {complaint}."
    answer = json.dumps({"name": name, "city": city, "category": category})
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ]
    }


def ticket_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [ticket_row(rng) for _ in range(n)]


def write_jsonl(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_cached_hub_dataset(
    cache_dir: str | os.PathLike,
    repo: str,
    splits: dict[str, list[dict[str, Any]]],
    commit: str,
    config: str = "default",
) -> Path:
    """Put `splits` into a `datasets` cache folder as a Hub download of `repo` at `commit` leaves them, so
    `load_dataset(repo)` finds them offline (no network: the rows go through a local parquet file)."""
    import shutil
    import tempfile

    import datasets
    from datasets.packaged_modules.parquet.parquet import Parquet

    cache_dir = Path(cache_dir)
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for split, rows in splits.items():
            files[split] = [str(Path(tmp) / f"{split}.parquet")]
            datasets.Dataset.from_list(rows).to_parquet(files[split][0])
        builder = Parquet(
            cache_dir=str(cache_dir),
            dataset_name=repo.split("/")[-1],
            repo_id=repo,
            hash=commit,
            data_files=files,
        )
        builder.download_and_prepare()
    # A Hub config's id is its name; a local build adds a hash of its data files to it.
    built = Path(builder.cache_dir)
    target = built.parents[1].with_name(config) / built.parent.name / built.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(built, target)
    if built.parents[1] != target.parents[1]:
        shutil.rmtree(built.parents[1])
    info = json.loads((target / "dataset_info.json").read_text())
    (target / "dataset_info.json").write_text(json.dumps({**info, "config_name": config}))
    return target


def _tokenizer_corpus() -> list[str]:
    words = NAMES + CITIES + LABELS + [s for phrases in CATEGORIES.values() for s in phrases]
    sample = [json.dumps(r) for r in ticket_rows(400, seed=99)]
    return [SYSTEM_PROMPT, "system user assistant tool", *words, *sample]


def build_tiny_model(
    out_dir: str | os.PathLike, *, seed: int = TINY_SEED, hidden: int = 64, layers: int = 2
) -> Path:
    """Write a random-weight Qwen2 and a freshly trained tokenizer to `out_dir` (deterministic for a seed)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bar writes blank lines to stdout, in front of `--json` output
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "right"
    fast.save_pretrained(out)

    config = Qwen2Config(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=fast.pad_token_id,
        # Wider than the usual 0.02: a 64-wide tied head with tiny embeddings caps the logits so low that
        # no adapter can make the model confident. 0.1 was the best of 0.02/0.1/0.2 for this task.
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    from transformers.utils import logging as hf_logging

    # One tiny shard: transformers' "Writing model shards" bar would only be noise in every first run.
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        hf_logging.enable_progress_bar()
    return out


def _in_process_group() -> bool:
    import sys

    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def cache_root() -> Path:
    return Path(os.environ.get("FT_CACHE", Path.home() / ".cache" / "ft"))


def _build_in_child(out_dir: Path) -> None:
    """build_tiny_model in a child process, so that this one imports neither torch nor transformers."""
    import subprocess
    import sys

    code = "import sys; from ft.testing import build_tiny_model; build_tiny_model(sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-c", code, str(out_dir)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building the tiny model failed:\n{done.stderr[-3000:]}")


def ensure_tiny_model() -> Path:
    """Build the tiny model once per machine (a few seconds) and reuse it; safe against concurrent builds.

    Building needs transformers. Where Unsloth is installed and neither it nor transformers is imported
    yet, the build runs in a child process: this command may still have to import Unsloth, which must
    come before transformers.
    """
    import importlib.util
    import sys

    from ft import __version__
    from ft.fsutil import atomic_dir

    target = cache_root() / f"tiny-qwen2-v{__version__}-s{TINY_SEED}"
    if (target / "config.json").is_file():
        return target
    unsloth_may_follow = not {"transformers", "unsloth"} & set(sys.modules) and bool(
        importlib.util.find_spec("unsloth")
    )
    try:
        with atomic_dir(target) as staging:
            # Under torchrun, transformers' save_pretrained writes the weights on rank 0 only; every other
            # rank would seal a folder holding just the tokenizer. A child process has no process group.
            if unsloth_may_follow or _in_process_group():
                _build_in_child(staging)
            else:
                build_tiny_model(staging)
            if not (staging / "config.json").is_file() or not any(staging.glob("*.safetensors")):
                raise FtError(f"{target}: building the tiny model wrote no weights")
    except Exception:
        if (target / "config.json").is_file():  # another process won the race
            return target
        raise
    return target
