"""Class balance: images per class, how imbalanced they are, and what a run does about it
(`--balance auto|weights|sampler|none` and the `--metric` that picks its best checkpoint)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from imagerec.config import TrainConfig
from imagerec.utils import ImageRecError

log = logging.getLogger("imagerec")


def class_counts(items: list, num_classes: int) -> np.ndarray:
    counts = np.zeros(num_classes, dtype=np.int64)
    for it in items:
        for t in (it.target if isinstance(it.target, tuple) else (it.target,)):
            counts[t] += 1
    return counts


def imbalance_ratio(counts: np.ndarray) -> float:
    present = counts[counts > 0]
    return float(present.max() / present.min()) if len(present) else 1.0


def resolve_balance(cfg: TrainConfig, counts: np.ndarray, multi_label: bool) -> tuple[str, str]:
    """(balance, metric) with 'auto' resolved: class weights and macro-F1 when the largest class
    has more than 3x the images of the smallest."""
    imbalanced = imbalance_ratio(counts) > 3.0
    balance = cfg.balance if cfg.balance != "auto" else ("weights" if imbalanced else "none")
    if balance == "sampler" and multi_label:
        # A multi-label image belongs to several classes, so no draw per class exists: the run
        # balances with BCE pos_weight, as it always did, and now says and records so.
        log.warning("--balance sampler draws class-balanced batches of single-label data; this data is multi-label, "
                    "so it is balanced with class weights instead (BCE pos_weight): --balance weights")
        balance = "weights"
    metric = cfg.metric
    if metric == "auto":
        metric = "map" if multi_label else ("macro_f1" if imbalanced else "accuracy")
    wrong = {"map": False, "balanced_accuracy": True}.get(metric)  # the kind of data each is not computed for
    if wrong is not None and wrong == multi_label:
        kind, fits = (("multi-label", "accuracy, loss, macro_f1 or map") if multi_label
                      else ("single-label", "accuracy, loss, macro_f1 or balanced_accuracy"))
        raise ImageRecError(f"--metric {metric} is not computed for {kind} data, so it could never pick a best "
                            f"checkpoint or stop early; use {fits} (or auto)")
    return balance, metric


def class_weights(counts: np.ndarray, n_items: int, multi_label: bool, cap: float = 10.0) -> torch.Tensor:
    """Single-label: n / (K * n_c) (sklearn's 'balanced'); multi-label: BCE pos_weight = neg / pos.
    Loss weights are capped at 10 so a class with a handful of images cannot dominate the loss; the
    sampler's are not (cap=inf): capped, a class under n / (10 K) images was drawn less than 1/K."""
    c = np.maximum(counts, 1).astype(np.float64)
    w = (n_items - c) / c if multi_label else n_items / (len(c) * c)
    return torch.tensor(np.minimum(w, cap), dtype=torch.float32)
