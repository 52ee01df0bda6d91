"""Evaluation metrics for single-label and multi-label classification.

Everything is computed with numpy from raw logits, so the same functions serve
`evaluate`, exported-model parity checks and offline analysis of saved logits.
Results are plain dicts of Python floats/ints/lists (JSON-serialisable, no NaN).

Example:
    >>> m = classification_metrics(logits, targets, ["cat", "dog", "fox"])
    >>> m["accuracy"], m["per_class"]["dog"]["f1"]
"""

from __future__ import annotations

from typing import Any

import numpy as np

# 15 equal-width bins is the convention of Guo et al. 2017 ("On Calibration of
# Modern Neural Networks"), so our ECE is comparable with published numbers.
ECE_BINS = 15


def _check_logits(logits: np.ndarray, class_names: list[str]) -> np.ndarray:
    """Validate a (N, K) logits array against the class names; return float64."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, K), got {logits.shape}")
    n, k = logits.shape
    if n == 0:
        raise ValueError("cannot compute metrics on zero samples")
    if k != len(class_names):
        raise ValueError(
            f"logits have {k} columns but {len(class_names)} class names were given; "
            "pass the class names the model was trained with"
        )
    if not np.all(np.isfinite(logits)):
        raise ValueError("logits contain NaN or inf; check the model output")
    return logits


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Elementwise num / den with 0.0 where den == 0 (sklearn's zero_division=0)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, ...]:
    """Precision, recall and F1 from per-class counts, 0.0 where undefined."""
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, tp + fn)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return precision, recall, f1


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> float:
    """Mean of values where mask is set, 0.0 if nothing is selected."""
    return float(values[mask].mean()) if mask.any() else 0.0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, num_bins: int = ECE_BINS
) -> float:
    """ECE over equal-width confidence bins (lo, hi]; weights are bin fractions."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    # Bin b holds confidences in (b/num_bins, (b+1)/num_bins]; confidence 0 goes to bin 0.
    bins = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    conf_sum = np.bincount(bins, weights=confidence, minlength=num_bins)
    acc_sum = np.bincount(bins, weights=correct, minlength=num_bins)
    gap = np.abs(acc_sum - conf_sum)  # = count * |acc - conf| per bin
    return float(gap.sum() / len(confidence))


def classification_metrics(
    logits: np.ndarray, targets: np.ndarray, class_names: list[str]
) -> dict[str, Any]:
    """Single-label metrics from raw logits.

    Macro averages and balanced accuracy use only classes with support; classes
    without support are still listed in `per_class` (support 0). Weighted averages
    weight by support. Top-k counts a sample as correct when fewer than k classes
    score strictly higher than the true class (ties resolved in its favour).

    Example:
        >>> m = classification_metrics(np.array([[2.0, 0.1]]), np.array([0]), ["a", "b"])
        >>> m["accuracy"], m["confusion_matrix"]
        (1.0, [[1, 0], [0, 0]])
    """
    logits = _check_logits(logits, class_names)
    n, k = logits.shape
    targets = np.asarray(targets)
    if targets.shape != (n,):
        raise ValueError(f"targets must have shape ({n},), got {targets.shape}")
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
    if targets.min() < 0 or targets.max() >= k:
        raise ValueError(
            f"targets must lie in [0, {k - 1}], got range [{targets.min()}, {targets.max()}]"
        )
    targets = targets.astype(np.int64)
    rows = np.arange(n)

    log_probs = log_softmax(logits)  # (N, K)
    loss = float(-log_probs[rows, targets].mean())
    probs = np.exp(log_probs)
    preds = logits.argmax(axis=1)
    correct = preds == targets

    topk = min(5, k)
    higher = (logits > logits[rows, targets][:, None]).sum(axis=1)
    top5 = float((higher < topk).mean())

    cm = np.bincount(targets * k + preds, minlength=k * k).reshape(k, k)  # (true, pred)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    precision, recall, f1 = _prf(tp, cm.sum(axis=0) - tp, support - tp)
    has_support = support > 0
    weights = support / n

    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }
    macro_recall = _masked_mean(recall, has_support)
    return {
        "num_samples": int(n),
        "accuracy": float(correct.mean()),
        "top5": top5,
        "loss": loss,
        "macro_precision": _masked_mean(precision, has_support),
        "macro_recall": macro_recall,
        "macro_f1": _masked_mean(f1, has_support),
        "weighted_precision": float((precision * weights).sum()),
        "weighted_recall": float((recall * weights).sum()),
        "weighted_f1": float((f1 * weights).sum()),
        # Balanced accuracy is by definition the macro recall over present classes.
        "balanced_accuracy": macro_recall,
        "ece": expected_calibration_error(probs.max(axis=1), correct),
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),
    }


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP as in sklearn's average_precision_score: sum_n (R_n - R_{n-1}) * P_n.

    Thresholds are the distinct scores, so tied scores enter together. Returns 0.0
    when there are no positives.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    num_pos = int(labels.sum())
    if num_pos == 0:
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    # Last index of each run of equal scores = one threshold.
    last = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
    tps = np.cumsum(labels)[last]
    precision = tps / (last + 1)
    recall = tps / num_pos
    delta_recall = np.diff(np.r_[0.0, recall])
    return float((delta_recall * precision).sum())


def _bce_with_logits(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean stable BCE-with-logits: max(x, 0) - x*y + log(1 + exp(-|x|))."""
    per_elem = np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits)))
    return float(per_elem.mean())


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Sigmoid that never overflows in exp."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def multilabel_metrics(
    logits: np.ndarray,
    targets: np.ndarray,
    class_names: list[str],
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Multi-label metrics from raw logits; a label is predicted when sigmoid >= threshold.

    `map` and `macro_f1` average over labels with at least one positive; labels
    without positives are listed with support 0 and ap 0.0. `accuracy` is
    exact-match (subset) accuracy.

    Example:
        >>> m = multilabel_metrics(logits, targets, ["cat", "dog"], threshold=0.5)
        >>> m["map"], m["per_class"]["dog"]["ap"]
    """
    logits = _check_logits(logits, class_names)
    n, k = logits.shape
    targets = np.asarray(targets)
    if targets.shape != (n, k):
        raise ValueError(f"targets must have shape ({n}, {k}), got {targets.shape}")
    if not np.isin(targets, (0, 1)).all():
        raise ValueError("multi-label targets must contain only 0 and 1")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    y = targets.astype(bool)
    pred = _sigmoid(logits) >= threshold  # (N, K)

    tp = (pred & y).sum(axis=0)
    fp = (pred & ~y).sum(axis=0)
    fn = (~pred & y).sum(axis=0)
    support = y.sum(axis=0)
    precision, recall, f1 = _prf(tp, fp, fn)
    # Logits are monotone in probability, so ranking on them gives the same AP.
    ap = np.array([average_precision(logits[:, j], y[:, j]) for j in range(k)])
    has_support = support > 0
    _, _, micro_f1 = _prf(tp.sum(), fp.sum(), fn.sum())

    per_class = {
        name: {
            "precision": float(precision[j]),
            "recall": float(recall[j]),
            "f1": float(f1[j]),
            "ap": float(ap[j]),
            "support": int(support[j]),
        }
        for j, name in enumerate(class_names)
    }
    return {
        "num_samples": int(n),
        "accuracy": float((pred == y).all(axis=1).mean()),
        "loss": _bce_with_logits(logits, y.astype(np.float64)),
        "map": _masked_mean(ap, has_support),
        "macro_f1": _masked_mean(f1, has_support),
        "micro_f1": float(micro_f1),
        "per_class": per_class,
    }
