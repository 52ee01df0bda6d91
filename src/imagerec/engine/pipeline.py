"""Host batch -> device batch, and inference over a loader; shared by training and evaluation."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from imagerec.config import PreprocessConfig
from imagerec.data.loader import Batch, ImageLoader
from imagerec.transforms import BatchAugment, normalize_batch


class BatchPipeline:
    """uint8 host batch -> normalised device batch (augmented when training), channels_last."""

    def __init__(self, pre: PreprocessConfig, device: torch.device, channels_last: bool, augment: BatchAugment | None = None) -> None:
        self.pre, self.device, self.channels_last, self.augment = pre, device, channels_last, augment

    def __call__(self, batch: Batch, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch.x.to(self.device, non_blocking=True)
        y = batch.y.to(self.device, non_blocking=True)
        if train and self.augment is not None:
            x = self.augment.geometric(x)
        x = normalize_batch(x, self.pre.mean, self.pre.std)
        if train and self.augment is not None:
            x, y = self.augment.after_normalize(x, y)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module, loader: ImageLoader, pipeline: BatchPipeline, amp_dtype: torch.dtype | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits (N, K) float32, targets, item indices) over every readable item of a loader, in order."""
    model.eval()
    logits, targets, index = [], [], []
    for batch in loader.epoch(0):
        x, _ = pipeline(batch, train=False)
        with autocast(pipeline.device, amp_dtype):
            out = model(x)
        logits.append(out.float().cpu())
        targets.append(batch.y)
        index.append(batch.index)
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros(0), np.zeros(0, np.int64)
    return torch.cat(logits).numpy(), torch.cat(targets).numpy(), torch.cat(index).numpy()
