"""Class imbalance: auto-detection, class weights, the sampler, and that balancing helps macro-F1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from imagerec.config import TrainConfig
from imagerec.data import read_data
from imagerec.data.idx import write_idx
from imagerec.engine.run import class_weights, resolve_balance, train


def test_auto_balance_triggers_above_ratio_three() -> None:
    cfg = TrainConfig()
    assert resolve_balance(cfg, np.array([100, 100, 40]), False) == ("none", "accuracy")
    assert resolve_balance(cfg, np.array([100, 100, 30]), False) == ("weights", "macro_f1")
    assert resolve_balance(cfg, np.array([100, 30]), True) == ("weights", "map")
    explicit = TrainConfig(balance="sampler", metric="loss")
    assert resolve_balance(explicit, np.array([100, 10]), False) == ("sampler", "loss")


def test_class_weights_are_inverse_frequency_and_capped() -> None:
    w = class_weights(np.array([900, 100, 1]), 1001, multi_label=False)
    assert w[0] == pytest.approx(1001 / (3 * 900))
    assert w[1] == pytest.approx(1001 / (3 * 100))
    assert w[2] == pytest.approx(10.0)  # capped
    pos = class_weights(np.array([10, 50]), 100, multi_label=True)
    assert pos.tolist() == pytest.approx([9.0, 1.0])


def write_imbalanced_mnist(root: Path, big: int, small: int) -> Path:
    """mnist-mini with digits 0-4 at `big` and 5-9 at `small` training images (test set untouched)."""
    spec = read_data("mnist-mini")
    labels = np.array([it.target for it in spec.splits["train"]])
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[: big if c < 5 else small] for c in range(10)]))
    root.mkdir()
    write_idx(root / "train-images-idx3-ubyte.gz", spec.arrays["train"][keep])
    write_idx(root / "train-labels-idx1-ubyte.gz", labels[keep].astype(np.uint8))
    write_idx(root / "t10k-images-idx3-ubyte.gz", spec.arrays["test"])
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.array([it.target for it in spec.splits["test"]], dtype=np.uint8))
    return root


def test_balancing_beats_none_on_a_ten_to_one_subset(tmp_path: Path) -> None:
    data = write_imbalanced_mnist(tmp_path / "imb", big=400, small=40)
    f1 = {}
    for balance in ("none", "auto", "sampler"):
        r = train(data=str(data), out=str(tmp_path / balance), epochs=3, balance=balance, seed=0)
        f1[balance] = r.metrics["test"]["macro_f1"]
        meta = json.loads((tmp_path / balance / "best.json").read_text())
        assert meta["data"]["imbalance_ratio"] == pytest.approx(10.0, rel=0.05)
        assert meta["train_config"]["metric"] == "macro_f1"  # chosen because the data is imbalanced
    assert meta["train_config"]["balance"] == "sampler"
    assert json.loads((tmp_path / "auto" / "best.json").read_text())["train_config"]["balance"] == "weights"
    assert f1["auto"] > f1["none"] + 0.05, f1
    assert f1["sampler"] > f1["none"] + 0.05, f1


def test_sampler_draws_minority_classes_about_evenly(tmp_path: Path) -> None:
    from imagerec.data.loader import ImageLoader, targets_tensor

    spec = read_data(str(write_imbalanced_mnist(tmp_path / "imb", big=200, small=20)))
    items = spec.splits["train"]
    counts = np.bincount([it.target for it in items], minlength=10)
    w = class_weights(counts, len(items), False)
    loader = ImageLoader(items, spec.arrays, 1, 28, lambda im: im, 64, targets_tensor(items, 10, False), shuffle=True,
                         fast_arrays=True, sample_weights=torch.tensor([float(w[it.target]) for it in items]))
    drawn = np.bincount(np.array([items[i].target for i in loader.order(0)]), minlength=10)
    assert drawn.min() > 0.5 * drawn.mean()  # without the sampler, digits 5-9 get a tenth of 0-4


def test_sampler_balances_classes_rarer_than_the_loss_weight_cap(tmp_path: Path) -> None:
    """QA: train() gave the sampler the loss weights, capped at 10, so a class under n / (10 K)
    images was drawn far less than 1/K (here 2 images a class against 400: 1.8% instead of 10%)."""
    from imagerec.engine.callbacks import Callback

    data = write_imbalanced_mnist(tmp_path / "imb", big=400, small=2)

    class Draws(Callback):
        def on_fit_start(self, trainer) -> None:  # type: ignore[no-untyped-def]
            loader = trainer.train_loader
            self.drawn = np.bincount(np.concatenate([loader.targets[loader.order(e)].numpy() for e in range(10)]),
                                     minlength=10)

    draws = Draws()
    train(data=str(data), out=str(tmp_path / "run"), model="mlp", epochs=1, balance="sampler", val_fraction=0.0,
          callbacks=[draws])
    share = draws.drawn / draws.drawn.sum()
    assert share.min() > 0.07 and share.max() < 0.13, share.round(3)
