"""Speed-up of 2 training processes (torchrun, DDP on gloo) over 1, on the CPU with the tiny recipe.

    python benchmarks/distributed.py               # 40 optimizer steps of 8 rows each, 1 repeat
    python benchmarks/distributed.py --steps 80 --repeats 3

Every side trains the same steps with the same effective batch (8 rows per step) on the same cores: one
process with micro-batch 8 with all cores for its threads, and again with one thread (on a busy machine
OpenMP threads that spin on shared cores can be the slower choice), and two processes with micro-batch 4
and an equal share of the cores each (OMP_NUM_THREADS). The speed-up is over the faster single process,
so it is what a second process buys, not what extra cores buy. Reported per side: the command's wall time (start-up, data check and saving included),
the training loop's time (`runtime_s` in run.json) and its tokens/s (tokens seen by all ranks / that
time). The tiny model's steps are short, so the gradient all-reduce and start-up weigh more than they
would on a real model; on 2 shared cores expect less than 2x. Multi-GPU (NCCL) figures are not measured
here. Results go to benchmarks/results/distributed.json and are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONHASHSEED": "0",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(work: Path, nproc: int, threads: int, steps: int, name: str) -> dict:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
        + ["--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "ft"]
        if nproc > 1
        else [sys.executable, "-m", "ft"]
    )
    args = [
        "train",
        "--recipe",
        "tiny",
        "--set",
        f"train.max_steps={steps}",
        "--set",
        f"output.run_name={name}",
    ]
    args += ["--set", f"train.micro_batch={8 // nproc}", "--set", f"train.save_every={steps}"]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FT_TEST_")},
        **OFFLINE,
        "OMP_NUM_THREADS": str(threads),
    }
    t0 = time.perf_counter()
    proc = subprocess.run(launcher + args, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{nproc} process(es) failed:\n{proc.stderr[-3000:]}")
    train = json.loads((work / "runs" / name / "run.json").read_text())["train"]
    return {
        "wall_s": round(wall, 2),
        "train_s": train["runtime_s"],
        "tokens": train["tokens_seen"],
        "tokens_per_s": round(train["tokens_seen"] / train["runtime_s"], 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=1)
    opts = parser.parse_args()
    cores = os.cpu_count() or 1
    # (processes, threads each): one process on every core, one on a single core, two sharing the cores.
    layouts = [(1, cores), (1, 1), (2, max(1, cores // 2))]
    sides: dict[str, list[dict]] = {f"{n}_process_{t}_threads": [] for n, t in layouts}
    with tempfile.TemporaryDirectory(prefix="ft-bench-dist-") as tmp:
        for i in range(opts.repeats):
            for n, t in layouts:
                sides[f"{n}_process_{t}_threads"].append(
                    _train(Path(tmp), n, t, opts.steps, f"p{n}-t{t}-{i}")
                )

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in sides[side])

    two = f"2_process_{max(1, cores // 2)}_threads"
    best_one = min((s for s in sides if s.startswith("1_")), key=lambda s: median(s, "train_s"))

    result = {
        "what": f"ft train --recipe tiny, {opts.steps} steps x 8 rows, CPU, 1 process vs 2 (torchrun, gloo)",
        "cpu_count": os.cpu_count(),
        "repeats": opts.repeats,
        "runs": sides,
        "baseline": f"{best_one} (the faster single process)",
        "speedup_tokens_per_s": round(median(two, "tokens_per_s") / median(best_one, "tokens_per_s"), 2),
        "speedup_wall": round(median(best_one, "wall_s") / median(two, "wall_s"), 2),
        "gpu": "not measured (no multi-GPU machine)",
    }
    out = ROOT / "benchmarks" / "results" / "distributed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
