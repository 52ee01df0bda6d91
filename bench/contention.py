"""Training beside other busy processes: what torch's default threads cost, and what the warning's
advice (`--num-threads`) gives back. One JSON line per case; the baseline is the same training on
the quiet machine, in the same invocation.

    python bench/contention.py                    # cnn on 20k MNIST digits, 2 epochs a case
    python bench/contention.py --hogs 2           # two other busy processes instead of one

The other work is a pure-Python busy loop per hog (one core each), started before the run and
killed after it. Each case reports the last epoch's img/s from the run's history.csv (the first
epoch pays start-up) and whether `imagerec train` printed the CpuLoadProbe warning.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mnist"
HOG = "while True: pass"


def train(tmp: Path, name: str, threads: int | None, hogs: int, extra: list[str]) -> dict:
    out = tmp / name
    args = [sys.executable, "-m", "imagerec.cli", "train", str(MNIST), "--out", str(out), *extra]
    if threads:
        args += ["--num-threads", str(threads)]
    env = dict(os.environ, IMAGEREC_CACHE=str(tmp / "cache"), IMAGEREC_HOME=str(tmp / "home"))
    others = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(hogs)]
    try:
        proc = subprocess.run(args, env=env, capture_output=True, text=True)
    finally:
        for p in others:
            p.kill()
            p.wait()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    return {"img_per_s": round(float(rows[-1]["img_per_s"]), 1), "warned": "--num-threads" in proc.stderr}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hogs", type=int, default=1, help="other busy processes (one core each)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of all cases, interleaved")
    p.add_argument("--train-args", default="--model cnn --epochs 2 --limit-train 20000 --batch-size 128",
                   help="flags for `imagerec train MNIST`")
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    fewer = max(1, cores - args.hogs)
    cases = [("quiet", None, 0), ("busy_default_threads", None, args.hogs), (f"busy_num_threads_{fewer}", fewer, args.hogs)]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            base = None
            for name, threads, hogs in cases:
                res = train(Path(tmp), f"{name}-{r}", threads, hogs, args.train_args.split())
                base = base or res["img_per_s"]
                print(json.dumps({"bench": "contention", "round": r, "case": name, "cores": cores, "hogs": hogs,
                                  "num_threads": threads or cores, **res,
                                  "vs_quiet": round(res["img_per_s"] / base, 3)}), flush=True)


if __name__ == "__main__":
    main()
