"""The "what" of training: a task turns a batch into {"loss", "logits"}; the trainer owns the "how"."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ClassificationTask:
    """Cross-entropy with label smoothing (soft targets from mixup/cutmix work too), or
    binary cross-entropy for multi-label data. Optional per-class weights."""

    def __init__(self, multi_label: bool = False, label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None) -> None:
        self.multi_label = multi_label
        self.label_smoothing = label_smoothing
        self.class_weights = class_weights

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = model(x)
        return {"loss": self.loss(logits, y), "logits": logits}

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # the loss in fp32 even under autocast
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits, y.float(), pos_weight=self.class_weights)
        return F.cross_entropy(logits, y, weight=self.class_weights, label_smoothing=self.label_smoothing)

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Number of right answers in the batch, as a tensor (no host sync)."""
        if self.multi_label:
            return ((logits > 0) == (y > 0.5)).all(dim=1).sum()
        target = y.argmax(dim=1) if y.ndim == 2 else y
        return (logits.argmax(dim=1) == target).sum()
