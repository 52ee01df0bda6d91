"""The exported graph: uint8 images in, probabilities out, with the model's own normalisation inside.

Putting normalisation (and softmax/sigmoid) inside the graph means a bundle's runtime input is the
same uint8 (B, C, H, W) batch that `Predictor.preprocess` produces, and its output is what
`Predictor.predict_batch` returns; no caller can feed it a wrongly normalised tensor, and the
mean/std live in one place (the graph) as well as in imagerec.json for reference.
"""

from __future__ import annotations

import torch
from torch import nn

from imagerec.config import PreprocessConfig


class InferenceGraph(nn.Module):
    """uint8 (B, C, H, W) -> probabilities (B, K): softmax, or sigmoid for multi-label models."""

    def __init__(self, model: nn.Module, pre: PreprocessConfig) -> None:
        super().__init__()
        self.model = model
        self.multi_label = pre.multi_label
        # The same arithmetic as transforms.normalize_batch: (x - mean*255) / (std*255).
        self.register_buffer("shift", torch.tensor(pre.mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("scale", torch.tensor(pre.std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model((x.float() - self.shift) / self.scale).float()
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)


def example_input(pre: PreprocessConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A random uint8 batch (B, C, H, W) for tracing; batch 2 so no size-1 dimension gets specialised."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, pre.channels, pre.input_size, pre.input_size), dtype=torch.uint8, generator=g)
