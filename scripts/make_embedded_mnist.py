"""Write the embedded `mnist-mini` dataset: a stratified, seeded MNIST subset in IDX .gz form.

Reads the four original MNIST files (verified by md5 through `resolve_named_dataset`),
keeps `--train-per-class` train and `--test-per-class` test images of every digit, drawn
without replacement by `numpy.random.default_rng(seed)`, and writes them in the original
IDX format, gzip-compressed with mtime=0 so that the same inputs give the same bytes.

Usage:
    python scripts/make_embedded_mnist.py                      # ../shared/datasets/mnist
    python scripts/make_embedded_mnist.py --source DIR --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from imagerec.data.idx import read_idx, write_idx  # noqa: E402
from imagerec.data.named import NAMED_DATASETS, resolve_named_dataset  # noqa: E402

OUT_DIR = REPO / "src" / "imagerec" / "data" / "embedded" / "mnist-mini"
NUM_CLASSES = 10


def stratified_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """`per_class` indices of each class, without replacement, returned in original order."""
    chosen = []
    for c in range(NUM_CLASSES):
        pool = np.flatnonzero(labels == c)
        if pool.size < per_class:
            raise ValueError(f"class {c} has only {pool.size} examples, {per_class} asked for")
        chosen.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


README = """\
# mnist-mini

A small, stratified subset of MNIST shipped inside `imagerec` so that examples, tests and
the quick-start work without any download: `resolve_named_dataset("mnist-mini")`.

| file | examples |
|---|---|
| train-images-idx3-ubyte.gz / train-labels-idx1-ubyte.gz | {n_train} ({train_pc} per digit) |
| t10k-images-idx3-ubyte.gz / t10k-labels-idx1-ubyte.gz | {n_test} ({test_pc} per digit) |

Same IDX format as the original files (28x28 uint8 grayscale, labels 0-9), gzip-compressed.

## How it was drawn
`scripts/make_embedded_mnist.py --seed {seed}`: from the original MNIST training set,
{train_pc} images of every digit; from the original test set, {test_pc} of every digit. Each
class is sampled without replacement with `numpy.random.default_rng({seed}).choice`
(classes 0 to 9 in turn, train first, then test, from one generator); the kept images are
in their original order. Test images come only from the MNIST test set, so no image is in
both splits. gzip is written with mtime=0, so rerunning the script gives the same bytes
(for the same numpy and zlib).

## Licence and attribution
MNIST database of handwritten digits, by Yann LeCun, Corinna Cortes and Christopher J. C.
Burges (http://yann.lecun.com/exdb/mnist/), made available under the Creative Commons
Attribution-Share Alike 3.0 licence (CC BY-SA 3.0,
https://creativecommons.org/licenses/by-sa/3.0/). This subset is a derivative of it and is
distributed under the same licence.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_source = REPO.parent / "shared" / "datasets" / "mnist"
    parser.add_argument("--source", type=Path, default=default_source if default_source.is_dir() else None,
                        help="folder with the 4 original MNIST .gz files (default: ../shared/datasets/mnist)")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=600)
    parser.add_argument("--test-per-class", type=int, default=100)
    args = parser.parse_args(argv)

    source = resolve_named_dataset("mnist", data_dir=args.source)  # checks every md5
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, per_class in (("train", args.train_per_class), ("t10k", args.test_per_class)):
        images = read_idx(source / f"{split}-images-idx3-ubyte.gz")
        labels = read_idx(source / f"{split}-labels-idx1-ubyte.gz")
        keep = stratified_indices(labels, per_class, rng)
        write_idx(args.out / f"{split}-images-idx3-ubyte.gz", images[keep])
        write_idx(args.out / f"{split}-labels-idx1-ubyte.gz", labels[keep])
        counts[split] = keep.size

    (args.out / "README.md").write_text(README.format(
        n_train=counts["train"], n_test=counts["t10k"], train_pc=args.train_per_class,
        test_pc=args.test_per_class, seed=args.seed,
    ))
    expected = {f.name: f.md5 for f in NAMED_DATASETS["mnist-mini"].files}
    stale = False
    for path in sorted(args.out.glob("*.gz")):
        md5 = hashlib.md5(path.read_bytes()).hexdigest()
        ok = md5 == expected.get(path.name)
        stale |= not ok
        verdict = "ok" if ok else "DIFFERS from NAMED_DATASETS"
        print(f"{path.name:28s} {path.stat().st_size:>9d} bytes  md5 {md5}  {verdict}")
    if stale:
        print("update the mnist-mini md5s in src/imagerec/data/named.py to the values above", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
