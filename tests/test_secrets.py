"""Planted credentials appear in nothing ft writes or prints.

Fake tokens go into the environment under the names people really use (HF_TOKEN, WANDB_API_KEY, an
FT_-prefixed one, cloud keys), then the whole loop runs in a subprocess: `ft run` (check, train, eval,
package), `ft verify` on the archive, and a failing command whose error message would contain a token.
Every file written -- the run directory with its checkpoints, the bundle, the archive decompressed
(tar headers included) and extracted, the Hugging Face home -- and everything printed on stdout and
stderr is searched for each token, whole and in part. (Image layers are the container tests' job.)
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import tarfile

SECRETS = {
    "HF_TOKEN": "hf_PlantedFakeToken0123456789abcdefXY",
    "HUGGING_FACE_HUB_TOKEN": "hf_SecondPlantedToken9876543210zyxwv",
    "WANDB_API_KEY": "0f1e2d3c4b5a69788796a5b4c3d2e1f0planted",
    "FT_HUB_TOKEN": "ft-planted-hub-token-5a5a5a5a5a5a",
    "AWS_SECRET_ACCESS_KEY": "PlantedAwsSecretKey/abcdEFGH1234+ijkl",
    "OPENAI_API_KEY": "sk-planted-openai-0123456789ABCDEFGH",
}


def needles(value: str) -> list[bytes]:
    """The whole token and a distinctive middle slice (catches a token cut short or partly masked)."""
    middle = value[len(value) // 3 : len(value) // 3 + 12]
    return [value.encode(), middle.encode()]


def leaks(data: bytes) -> list[str]:
    return [name for name, value in SECRETS.items() if any(n in data for n in needles(value))]


def test_the_search_finds_a_token_whole_or_cut_short():
    assert leaks(f"token={SECRETS['HF_TOKEN']}".encode()) == ["HF_TOKEN"]
    assert leaks(SECRETS["WANDB_API_KEY"][:26].encode() + b"...") == ["WANDB_API_KEY"]
    assert leaks(b"token=***") == []


def test_planted_tokens_appear_in_no_output_or_log(tmp_path, tiny_model_dir):
    env = {**os.environ, **SECRETS, "HF_HOME": str(tmp_path / "hf-home")}

    def ft(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "ft", *args], cwd=tmp_path, env=env, capture_output=True, timeout=900
        )

    quick = ["--set", "train.max_steps=6", "--set", "eval.max_examples=8", "--set", "eval.max_new_tokens=16"]
    run = ft("run", "--recipe", "tiny", *quick, "--set", "output.run_name=s")
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    verify = ft("verify", "bundles/s.tar.gz")
    assert verify.returncode == 0, verify.stderr.decode()[-3000:]
    missing = ft("data", "check", "--recipe", "tiny", "--train", f"no/such/{SECRETS['HF_TOKEN']}.jsonl")
    assert missing.returncode == 2 and b"error:" in missing.stderr

    with tarfile.open(tmp_path / "bundles" / "s.tar.gz") as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    found = {}
    for proc, name in ((run, "ft run"), (verify, "ft verify"), (missing, "ft data check")):
        for stream in ("stdout", "stderr"):
            found[f"{name} {stream}"] = leaks(getattr(proc, stream))
    found["s.tar.gz (decompressed)"] = leaks(
        gzip.decompress((tmp_path / "bundles" / "s.tar.gz").read_bytes())
    )
    files = [p for p in sorted(tmp_path.rglob("*")) if p.is_file()]
    for path in files:
        found[path.relative_to(tmp_path).as_posix()] = leaks(path.read_bytes())

    assert {where: names for where, names in found.items() if names} == {}
    # The search really covered the outputs: run directory, checkpoints, bundle, extracted archive.
    names = {p.relative_to(tmp_path).as_posix() for p in files}
    for expected in (
        "runs/s/env.json",
        "runs/s/run.json",
        "runs/s/eval/report.md",
        "runs/s/checkpoints/step-000006/trainer_state.json",
        "bundles/s/MANIFEST.json",
        "extracted/s/env.json",
    ):
        assert expected in names, expected
    assert b"***" in missing.stderr  # the token in the path was masked, not just absent
