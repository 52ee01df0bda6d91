"""Accuracy targets of imagerec 0.1, through the real CLI; one JSON line per job.

    python bench/accuracy.py demo mnist cifar10

Each line has the job, the command, test accuracy vs its target, wall time (whole command) and
train time. Absolute times depend on the machine, so every line also carries the matmul
throughput (bf16 where native, else fp32) measured at the start of the same invocation: compare runs by time x GFLOP/s.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
JOBS = {
    "demo": (["demo", "--out", "{out}"], 0.95),
    "mnist": (["train", str(SHARED / "mnist"), "--out", "{out}"], 0.99),
    "cifar10": (
        ["train", str(SHARED / "cifar10-jpg.tar.gz"), "--out", "{out}", "--model", "cnn-large",
         "--augment", "standard", "--epochs", "10", "--batch-size", "256"],
        0.85,
    ),
}


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    """Matmul GFLOP/s in the precision the trainer uses here (bf16 only where the CPU has it natively)."""
    from imagerec.utils import resolve_device, resolve_precision

    dtype = resolve_precision("auto", resolve_device("cpu")) or torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def run_job(name: str, peak: float) -> dict:
    args, target = JOBS[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "imagerec.cli"] + [a.format(out=out) for a in args]
        env = dict(os.environ, IMAGEREC_CACHE=str(Path(tmp) / "cache"))
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            return {"bench": "accuracy", "job": name, "error": proc.stderr[-2000:]}
        m = json.loads((out / "metrics.json").read_text())
    acc = m["test"]["accuracy"]
    return {
        "bench": "accuracy",
        "job": name,
        "command": "imagerec " + " ".join(a.replace(str(SHARED), "../shared/datasets") for a in args).format(out="DIR"),
        "model": m["model"],
        "epochs": m["epochs_run"],
        "test_accuracy": round(acc, 4),
        "target": target,
        "pass": acc >= target,
        "wall_s": round(wall, 1),
        "train_s": m["train_seconds"],
        "train_img_per_s": round(m["train_images"] * m["epochs_run"] / m["train_seconds"], 1),
        "matmul_gflops_same_run": round(peak, 1),
        "cpus": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }


def main() -> None:
    names = sys.argv[1:] or ["demo", "mnist"]
    unknown = [n for n in names if n not in JOBS]
    if unknown:
        sys.exit(f"unknown job(s) {unknown}: choose from {list(JOBS)}")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    peak = matmul_gflops()
    for name in names:
        print(json.dumps(run_job(name, peak)), flush=True)


if __name__ == "__main__":
    main()
