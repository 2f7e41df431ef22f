"""Time and peak memory of `ft export --to all` (merge, GGUF f16 + quantisations, Modelfile, load-back checks).

    python benchmarks/export.py                 # trains the tiny recipe once, then exports its bundle
    python benchmarks/export.py BUNDLE          # any sealed bundle

Peak memory is the largest resident set of the export process and its children (the converter runs as a
child), sampled every 50 ms with psutil. Phase times come from the export's own report. Results go to
benchmarks/results/export.json and are printed, with the 7B extrapolation of disk use (sizes scale with
parameter count; marked as an estimate).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONHASHSEED": "0",
}
# Bytes per parameter of each format, for the 7B estimate (GGUF: llama.cpp's nominal bits per weight).
PARAMS_7B = 7.6e9  # Qwen2.5-7B
BYTES_PER_PARAM = {"merged (bf16)": 2.0, "f16": 2.0, "q8_0": 8.5 / 8, "q4_k_m": 4.85 / 8}


def _run_measured(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    return time.perf_counter() - t0, peak, proc.returncode


def main() -> int:
    env = {**os.environ, **OFFLINE}
    with tempfile.TemporaryDirectory(prefix="ft-bench-export-") as tmp:
        work = Path(tmp)
        env.setdefault("FT_CACHE", str(work / "cache"))
        if len(sys.argv) > 1:
            bundle = Path(sys.argv[1]).resolve()
        else:
            subprocess.run(
                [sys.executable, "-m", "ft", "run", "--recipe", "tiny", "--set", "output.run_name=bench"],
                env=env,
                cwd=work,
                check=True,
            )
            bundle = work / "bundles" / "bench"
        out = work / "exports"
        cmd = [sys.executable, "-m", "ft", "export", str(bundle), "--to", "all", "--out", str(out)]
        wall, peak, rc = _run_measured(cmd, env, work)
        report = json.loads(
            (out / bundle.name.removesuffix(".tar.gz") / "export" / "report.json").read_text()
        )
    params = report["merged"]["parameters"]
    sizes = {r["format"]: r["bytes"] for r in report["formats_checked"]}
    est_7b = {k: round(PARAMS_7B * v / 2**30, 1) for k, v in BYTES_PER_PARAM.items()}
    result = {
        "exit_code": rc,
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(peak / 2**20),
        "phases_s": report["timings_s"],
        "parameters": params,
        "bytes": sizes,
        "machine": {"cpus": os.cpu_count(), "cpu_model": _cpu()},
        "estimate_7b_gib": {
            **est_7b,
            # the whole export bundle; a re-export needs as much again until the new one replaces the old
            "export_bundle_total": round(sum(est_7b.values()), 1),
        },
    }
    dest = ROOT / "benchmarks" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "export.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return rc


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
