"""Tests for imagerec.metrics and imagerec.report against hand-computed values and torch."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console

from imagerec.metrics import (
    average_precision,
    classification_metrics,
    expected_calibration_error,
    multilabel_metrics,
)
from imagerec.report import metrics_table, save_confusion_matrix_png, summary_line

NAMES3 = ["a", "b", "c"]

# Softmax probabilities per sample (rows sum to 1); logits are log(p) plus a per-row
# shift, which softmax must ignore. Confidences avoid the 1/15 ECE bin edges.
PROBS = np.array(
    [
        [0.85, 0.10, 0.05],  # t=a pred a
        [0.65, 0.30, 0.05],  # t=a pred a
        [0.30, 0.65, 0.05],  # t=a pred b
        [0.10, 0.85, 0.05],  # t=b pred b
        [0.20, 0.75, 0.05],  # t=b pred b
        [0.55, 0.40, 0.05],  # t=b pred a
        [0.10, 0.15, 0.75],  # t=c pred c
        [0.05, 0.55, 0.40],  # t=c pred b
    ]
)
TARGETS = np.array([0, 0, 0, 1, 1, 1, 2, 2])


def _logits_from_probs(probs: np.ndarray) -> np.ndarray:
    shift = np.arange(len(probs), dtype=np.float64)[:, None] * 3.0 - 7.0
    return np.log(probs) + shift


def _all_finite(obj: Any) -> bool:
    """True when every number nested in obj is finite."""
    if isinstance(obj, dict):
        return all(_all_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_all_finite(v) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return isinstance(obj, (int, str))


def _one_hot_logits(preds: list[int], k: int, scale: float = 5.0) -> np.ndarray:
    logits = np.zeros((len(preds), k))
    logits[np.arange(len(preds)), preds] = scale
    return logits


# ---------------------------------------------------------------- single-label


def test_classification_hand_computed() -> None:
    m = classification_metrics(_logits_from_probs(PROBS), TARGETS, NAMES3)

    assert m["num_samples"] == 8
    assert m["confusion_matrix"] == [[2, 1, 0], [1, 2, 0], [0, 1, 1]]
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["top5"] == pytest.approx(1.0)  # K=3 -> top-3 always contains the target
    p_true = np.array([0.85, 0.65, 0.30, 0.85, 0.75, 0.40, 0.75, 0.40])
    assert m["loss"] == pytest.approx(float(-np.log(p_true).mean()), rel=1e-12)

    # precision = tp / predicted: a 2/3, b 2/4, c 1/1; recall = tp / support: 2/3, 2/3, 1/2
    pc = m["per_class"]
    assert pc["a"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert pc["b"] == pytest.approx({"precision": 1 / 2, "recall": 2 / 3, "f1": 4 / 7, "support": 3})
    assert pc["c"] == pytest.approx({"precision": 1.0, "recall": 1 / 2, "f1": 2 / 3, "support": 2})

    assert m["macro_precision"] == pytest.approx(13 / 18)
    assert m["macro_recall"] == pytest.approx(11 / 18)
    assert m["macro_f1"] == pytest.approx(40 / 63)
    assert m["weighted_precision"] == pytest.approx(11 / 16)
    assert m["weighted_recall"] == pytest.approx(5 / 8)
    assert m["weighted_f1"] == pytest.approx(53 / 84)
    assert m["balanced_accuracy"] == pytest.approx(11 / 18)

    # Bins (conf, acc, n): 0.85 (1, 2), 0.65 (1/2, 2), 0.75 (1, 2), 0.55 (0, 2)
    # ECE = (2*0.15 + 2*0.15 + 2*0.25 + 2*0.55) / 8
    assert m["ece"] == pytest.approx(0.275)

    assert set(m) == {
        "num_samples", "accuracy", "top5", "loss", "macro_precision", "macro_recall",
        "macro_f1", "weighted_precision", "weighted_recall", "weighted_f1",
        "balanced_accuracy", "ece", "per_class", "confusion_matrix",
    }
    assert all(type(m[key]) is float for key in m if key not in
               {"num_samples", "per_class", "confusion_matrix"})
    assert all(type(v) is int for row in m["confusion_matrix"] for v in row)
    json.dumps(m, allow_nan=False)  # raises if anything is not JSON-serialisable


def test_ece_uses_15_equal_width_bins() -> None:
    # 0.61 and 0.69 share a bin with 10 bins ((0.6, 0.7]) but not with 15
    # ((0.6, 0.667] and (0.667, 0.733]), so this pins the bin count.
    ece = expected_calibration_error(np.array([0.61, 0.69]), np.array([1, 0]))
    assert ece == pytest.approx((0.39 + 0.69) / 2)
    # Confidence 1.0 falls in the last bin, not past it.
    assert expected_calibration_error(np.array([1.0, 1.0]), np.array([1, 0])) \
        == pytest.approx(0.5)


def test_class_never_predicted_has_zero_precision() -> None:
    # Class c has support 2 but is never predicted.
    m = classification_metrics(_one_hot_logits([0, 1, 1, 1], 3), np.array([0, 1, 2, 2]), NAMES3)
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert m["per_class"]["b"]["precision"] == pytest.approx(1 / 3)
    assert m["macro_precision"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 + 0) / 3)
    assert _all_finite(m)


def test_class_with_zero_support_is_listed_but_not_averaged() -> None:
    names = ["a", "b", "c", "d"]
    # c: no support, never predicted; d: no support, predicted once (false positive).
    m = classification_metrics(_one_hot_logits([0, 3, 1, 1], 4), np.array([0, 0, 1, 1]), names)
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["confusion_matrix"] == [[1, 0, 0, 1], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["macro_precision"] == pytest.approx(1.0)  # mean over a, b only
    assert m["macro_recall"] == pytest.approx(0.75)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["weighted_f1"] == pytest.approx((2 * 2 / 3 + 2 * 1) / 4)
    assert _all_finite(m)


def test_perfect_predictions() -> None:
    targets = np.array([0, 1, 2, 2, 1, 0, 0])
    m = classification_metrics(_one_hot_logits(list(targets), 3, scale=40.0), targets, NAMES3)
    assert m["accuracy"] == 1.0
    assert m["top5"] == 1.0
    assert m["macro_f1"] == pytest.approx(1.0)
    assert m["weighted_f1"] == pytest.approx(1.0)
    assert m["balanced_accuracy"] == pytest.approx(1.0)
    assert m["ece"] < 1e-12
    assert 0.0 <= m["loss"] < 1e-12
    assert m["confusion_matrix"] == [[3, 0, 0], [0, 2, 0], [0, 0, 2]]


def test_top5_with_more_classes() -> None:
    # Scores fall with the class index, so the target's rank equals its index.
    logits = np.tile(np.arange(7, dtype=np.float64)[::-1], (4, 1))
    m = classification_metrics(logits, np.array([0, 4, 5, 6]), list("abcdefg"))
    assert m["accuracy"] == pytest.approx(0.25)
    assert m["top5"] == pytest.approx(0.5)  # ranks 0 and 4 are within the top 5


def test_top5_with_two_classes_is_one() -> None:
    m = classification_metrics(_one_hot_logits([1, 1, 0], 2), np.array([0, 1, 1]), ["x", "y"])
    assert m["top5"] == 1.0
    assert m["accuracy"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("scale", [1.0, 30.0, 1000.0])
def test_loss_matches_torch_cross_entropy(scale: float) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 10)) * scale
    targets = rng.integers(0, 10, size=64)
    expected = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets)).item()
    m = classification_metrics(logits, targets, [str(i) for i in range(10)])
    assert math.isfinite(m["loss"])
    assert m["loss"] == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert m["accuracy"] == pytest.approx(float((logits.argmax(1) == targets).mean()))


def test_classification_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="class names"):
        classification_metrics(np.zeros((2, 3)), np.array([0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        classification_metrics(np.zeros((2, 3)), np.array([0, 3]), NAMES3)
    with pytest.raises(ValueError, match="zero samples"):
        classification_metrics(np.zeros((0, 3)), np.array([], dtype=int), NAMES3)


# ----------------------------------------------------------------- multi-label


def test_average_precision_hand_computed() -> None:
    # Ranked labels 1,0,1,0,1 -> AP = (1 + 2/3 + 3/5) / 3
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([1, 0, 1, 0, 1])) \
        == pytest.approx(34 / 45)
    # Tied scores form one threshold: P@{0.9}=1, P@{0.5}=2/3, P@{0.1}=3/4
    assert average_precision(np.array([0.9, 0.5, 0.5, 0.1]), np.array([1, 1, 0, 1])) \
        == pytest.approx(29 / 36)
    assert average_precision(np.array([0.3, 0.2]), np.array([0, 0])) == 0.0


ML_LOGITS = np.array(
    [
        [2.0, -1.0, 0.5],
        [1.0, 3.0, -2.0],
        [-1.0, 0.5, -3.0],
        [-2.0, -0.5, 1.0],
    ]
)
ML_TARGETS = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 1, 0]])


def test_multilabel_hand_computed() -> None:
    m = multilabel_metrics(ML_LOGITS, ML_TARGETS, ["x", "y", "z"])
    assert set(m) == {"num_samples", "accuracy", "loss", "map", "macro_f1", "micro_f1", "per_class"}
    assert m["num_samples"] == 4
    assert m["accuracy"] == pytest.approx(0.25)  # only row 1 matches exactly
    pc = m["per_class"]
    assert pc["x"] == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "ap": 11 / 12, "support": 3})
    assert pc["y"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "ap": 5 / 6, "support": 2})
    # z has no positives: listed, all zeros, excluded from mAP and macro-F1.
    assert pc["z"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "ap": 0.0, "support": 0}
    assert m["map"] == pytest.approx(7 / 8)
    assert m["macro_f1"] == pytest.approx(0.65)
    assert m["micro_f1"] == pytest.approx(6 / 11)  # tp 3, fp 3, fn 2

    sig = 1 / (1 + np.exp(-ML_LOGITS))
    naive_bce = -(ML_TARGETS * np.log(sig) + (1 - ML_TARGETS) * np.log(1 - sig)).mean()
    assert m["loss"] == pytest.approx(float(naive_bce), rel=1e-12)
    assert _all_finite(m)
    json.dumps(m, allow_nan=False)


def test_multilabel_threshold() -> None:
    # sigmoid >= 0.9 means logit >= log(9) ~ 2.197: only the 3.0 of label y fires.
    m = multilabel_metrics(ML_LOGITS, ML_TARGETS, ["x", "y", "z"], threshold=0.9)
    assert m["per_class"]["x"]["precision"] == 0.0
    assert m["per_class"]["y"]["precision"] == pytest.approx(1.0)
    assert m["per_class"]["y"]["recall"] == pytest.approx(0.5)
    assert m["map"] == pytest.approx(7 / 8)  # AP does not depend on the threshold
    with pytest.raises(ValueError, match="threshold"):
        multilabel_metrics(ML_LOGITS, ML_TARGETS, ["x", "y", "z"], threshold=1.5)


@pytest.mark.parametrize("scale", [1.0, 50.0, 1000.0])
def test_bce_matches_torch(scale: float) -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(32, 6)) * scale
    targets = rng.integers(0, 2, size=(32, 6))
    expected = F.binary_cross_entropy_with_logits(
        torch.from_numpy(logits), torch.from_numpy(targets.astype(np.float64))).item()
    m = multilabel_metrics(logits, targets, [str(i) for i in range(6)])
    assert m["loss"] == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_multilabel_rejects_non_binary_targets() -> None:
    with pytest.raises(ValueError, match="0 and 1"):
        multilabel_metrics(ML_LOGITS, ML_TARGETS * 2, ["x", "y", "z"])


# ---------------------------------------------------------------------- report


@pytest.mark.parametrize("k", [3, 100])
def test_confusion_matrix_png(tmp_path: Path, k: int) -> None:
    rng = np.random.default_rng(k)
    cm = rng.integers(0, 20, size=(k, k))
    cm[0] = 0  # a class without samples must not break row normalisation
    path = tmp_path / "sub" / "cm.png"
    save_confusion_matrix_png(cm.tolist(), [f"class_{i}" for i in range(k)], path, title="val")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        assert img.format == "PNG"
        width, height = img.size
    assert 400 <= width <= 5000 and 400 <= height <= 5000
    if k == 100:
        assert width >= 2000  # the figure grows so 100 labels stay legible
    assert path.stat().st_size > 5_000


def test_confusion_matrix_png_rejects_wrong_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="class names"):
        save_confusion_matrix_png([[1, 2], [3, 4]], NAMES3, tmp_path / "cm.png")


def _render(table: Any) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(table)
    return console.file.getvalue()


def test_metrics_table_single_label() -> None:
    m = classification_metrics(_logits_from_probs(PROBS), TARGETS, NAMES3)
    table = metrics_table(m, "val")
    assert table.row_count == 3 + 2
    assert [c.header for c in table.columns] == ["class", "precision", "recall", "F1", "support"]
    text = _render(table)
    assert "macro avg" in text and "weighted avg" in text
    assert "0.571" in text  # F1 of b = 4/7
    assert "0.722" in text  # macro precision = 13/18


def test_metrics_table_multilabel() -> None:
    m = multilabel_metrics(ML_LOGITS, ML_TARGETS, ["x", "y", "z"])
    table = metrics_table(m, "val")
    assert table.row_count == 3 + 2
    assert "AP" in [c.header for c in table.columns]
    text = _render(table)
    assert "0.917" in text  # AP of x = 11/12
    assert "0.875" in text and "micro avg" in text


def test_summary_line() -> None:
    m = classification_metrics(_logits_from_probs(PROBS), TARGETS, NAMES3)
    assert summary_line(m) == (
        f"accuracy 62.50%  top-5 100.00%  loss {m['loss']:.3f}  macro-F1 0.635  "
        "balanced acc 61.11%"
    )
    ml = multilabel_metrics(ML_LOGITS, ML_TARGETS, ["x", "y", "z"])
    assert summary_line(ml) == (
        f"exact-match 25.00%  mAP 0.875  loss {ml['loss']:.3f}  macro-F1 0.650  micro-F1 0.545"
    )
