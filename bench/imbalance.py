"""--balance auto vs none on a 10:1 imbalanced subset of real MNIST; one JSON line per setting.

    python bench/imbalance.py [--epochs 5]

Digits 0-4 keep 4,000 training images each, digits 5-9 keep 400 (ratio 10:1); the test set is
the full, balanced MNIST t10k. Both runs use the same seed, model and epochs, in one invocation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from imagerec.data import read_data
from imagerec.data.idx import write_idx

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def make_subset(out: Path, big: int = 4000, small: int = 400) -> dict[str, int]:
    spec = read_data(str(SHARED / "mnist"))
    labels = np.array([it.target for it in spec.splits["train"]])
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[: big if c < 5 else small] for c in range(10)]))
    out.mkdir(parents=True)
    write_idx(out / "train-images-idx3-ubyte.gz", spec.arrays["train"][keep])
    write_idx(out / "train-labels-idx1-ubyte.gz", labels[keep].astype(np.uint8))
    for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (out / f).write_bytes((SHARED / "mnist" / f).read_bytes())
    return {str(c): int((labels[keep] == c).sum()) for c in range(10)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "mnist-10to1"
        counts = make_subset(data)
        for balance in ("none", "auto", "sampler"):
            out = Path(tmp) / balance
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "imagerec.cli", "train", str(data), "--out", str(out),
                            "--epochs", str(args.epochs), "--balance", balance], check=True, capture_output=True)
            m = json.loads((out / "metrics.json").read_text())["test"]
            worst = min(m["per_class"].items(), key=lambda kv: kv[1]["recall"])
            print(json.dumps({
                "bench": "imbalance", "balance": balance, "train_counts": counts, "epochs": args.epochs,
                "test_macro_f1": round(m["macro_f1"], 4), "test_accuracy": round(m["accuracy"], 4),
                "test_balanced_accuracy": round(m["balanced_accuracy"], 4),
                "worst_class_recall": {worst[0]: round(worst[1]["recall"], 4)},
                "wall_s": round(time.perf_counter() - t, 1),
            }), flush=True)


if __name__ == "__main__":
    main()
