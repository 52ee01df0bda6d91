"""Human-readable views of metric dicts: a confusion-matrix PNG, a rich table, one line.

These take the dicts produced by `imagerec.metrics` and never recompute metrics.

Example:
    >>> m = classification_metrics(logits, targets, names)
    >>> save_confusion_matrix_png(m["confusion_matrix"], names, "runs/exp/cm.png")
    >>> rich.print(metrics_table(m, "val")); print(summary_line(m))
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.table import Table
from rich.text import Text

from imagerec.metrics import ECE_BINS
from imagerec.utils import atomic_write

# Above this many classes, cell counts are unreadable and are left out.
MAX_CLASSES_WITH_COUNTS = 20


def save_confusion_matrix_png(
    cm: list[list[int]],
    class_names: list[str],
    path: str | os.PathLike[str],
    title: str = "",
) -> None:
    """Write `confusion_matrix_png` to `path` (atomically).

    Example:
        >>> save_confusion_matrix_png([[5, 1], [0, 4]], ["cat", "dog"], "cm.png", "val")
    """
    png = confusion_matrix_png(cm, class_names, title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as f:
        f.write(png)


def confusion_matrix_png(cm: list[list[int]], class_names: list[str], title: str = "") -> bytes:
    """A row-normalised confusion matrix (rows = true, cols = predicted) as PNG bytes.

    Colours show the fraction of each true class predicted as each class; for up
    to 20 classes the raw counts are written in the cells. The figure grows with
    the number of classes so that ~100 classes stay legible.

    Example:
        >>> Path("cm.png").write_bytes(confusion_matrix_png([[5, 1], [0, 4]], ["cat", "dog"], "val"))
    """
    counts = np.asarray(cm, dtype=np.int64)
    k = len(class_names)
    if counts.shape != (k, k):
        raise ValueError(
            f"confusion matrix has shape {counts.shape} but {k} class names were given"
        )
    row_sums = counts.sum(axis=1, keepdims=True)
    # Rows of classes with no samples stay at 0 instead of dividing by zero.
    norm = np.divide(counts, row_sums, out=np.zeros(counts.shape), where=row_sums > 0)

    # ~0.2 in (24 px at dpi 120) per class keeps 100 tick labels apart without huge files.
    side = float(np.clip(3.0 + 0.2 * k, 5.0, 24.0))  # inches
    tick_size = float(np.clip(11 - k / 15, 5, 10))
    # Figure + Agg canvas directly: no pyplot, so no global backend or figure state.
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, pad=0.02, label="fraction of true class")

    ticks = np.arange(k)
    # parse_math=False: class names and the title are shown as written; a "$" pair in them
    # ("$0-$9", a folder "run_$^$") is not TeX math to typeset, or to fail on.
    ax.set_xticks(ticks, labels=class_names, rotation=90 if k > 10 else 45,
                  ha="center" if k > 10 else "right", fontsize=tick_size, parse_math=False)
    ax.set_yticks(ticks, labels=class_names, fontsize=tick_size, parse_math=False)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    if title:
        ax.set_title(title, parse_math=False)

    if k <= MAX_CLASSES_WITH_COUNTS:
        cell_size = float(np.clip(12 - k / 2.5, 6, 11))
        for i in range(k):
            for j in range(k):
                colour = "white" if norm[i, j] > 0.5 else "black"
                ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                        color=colour, fontsize=cell_size)

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=120, format="png")
    return buffer.getvalue()


def _is_multilabel(metrics: dict[str, Any]) -> bool:
    """Multi-label dicts carry `map`; single-label ones carry `confusion_matrix`."""
    return "map" in metrics


def metrics_table(metrics: dict[str, Any], title: str) -> Table:
    """A rich table with one row per class, then macro and weighted (or micro) averages; the
    calibration error (ECE) in its caption. The title and class names are plain text, shown as
    written (`[...]` in them is never read as Rich markup).

    Example:
        >>> rich.print(metrics_table(classification_metrics(logits, y, names), "val"))
    """
    multilabel = _is_multilabel(metrics)
    ece = metrics.get("ece")
    table = Table(title=Text(title, style="table.title"), caption=None if ece is None else f"expected calibration error (ECE, {ECE_BINS} bins) {ece:.4f}")
    table.add_column("class", style="bold")
    for name in ("precision", "recall", "F1"):
        table.add_column(name, justify="right")
    if multilabel:
        table.add_column("AP", justify="right")
    table.add_column("support", justify="right")

    def row(name: str, p: float | None, r: float | None, f1: float | None,
            ap: float | None, support: int, end_section: bool = False) -> None:
        cells: list[str | Text] = [Text(name)] + [("" if v is None else f"{v:.3f}") for v in (p, r, f1)]
        if multilabel:
            cells.append("" if ap is None else f"{ap:.3f}")
        cells.append(str(support))
        table.add_row(*cells, end_section=end_section)

    per_class: dict[str, dict[str, Any]] = metrics["per_class"]
    items = list(per_class.items())
    for idx, (name, stats) in enumerate(items):
        row(name, stats["precision"], stats["recall"], stats["f1"], stats.get("ap"),
            stats["support"], end_section=idx == len(items) - 1)

    total = sum(int(s["support"]) for s in per_class.values())
    if multilabel:
        # Multi-label dicts report macro/micro F1 and mAP only; P/R cells stay blank.
        row("macro avg", None, None, metrics["macro_f1"], metrics["map"], total)
        row("micro avg", None, None, metrics["micro_f1"], None, total)
    else:
        row("macro avg", metrics["macro_precision"], metrics["macro_recall"],
            metrics["macro_f1"], None, total)
        row("weighted avg", metrics["weighted_precision"], metrics["weighted_recall"],
            metrics["weighted_f1"], None, total)
    return table


def summary_line(metrics: dict[str, Any]) -> str:
    """One line with the headline numbers, e.g. for logs and progress bars.

    Example:
        >>> summary_line(m)
        'accuracy 99.12%  top-5 99.98%  loss 0.031  macro-F1 0.991  balanced acc 99.10%'
    """
    if _is_multilabel(metrics):
        return (
            f"exact-match {100 * metrics['accuracy']:.2f}%  mAP {metrics['map']:.3f}  "
            f"loss {metrics['loss']:.3f}  macro-F1 {metrics['macro_f1']:.3f}  "
            f"micro-F1 {metrics['micro_f1']:.3f}"
        )
    return (
        f"accuracy {100 * metrics['accuracy']:.2f}%  top-5 {100 * metrics['top5']:.2f}%  "
        f"loss {metrics['loss']:.3f}  macro-F1 {metrics['macro_f1']:.3f}  "
        f"balanced acc {100 * metrics['balanced_accuracy']:.2f}%"
    )
