"""`mlp`: a flatten -> fully connected baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from imagerec.models._registry import register_model
from imagerec.models.base import Classifier
from imagerec.utils import ImageRecError


class MLP(Classifier):
    """Flatten the image, then Linear/BatchNorm1d/GELU/Dropout blocks, then a Linear head."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        img_size: int = 224,
        hidden: Sequence[int] = (512, 256),
        drop_rate: float = 0.1,
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.img_size = img_size
        self.in_features = in_chans * img_size * img_size
        layers: list[nn.Module] = []
        prev = self.in_features
        for h in hidden:
            # Bias off: the BatchNorm1d that follows has its own shift.
            layers += [nn.Linear(prev, h, bias=False), nn.BatchNorm1d(h), nn.GELU(), nn.Dropout(drop_rate)]
            prev = h
        self.blocks = nn.Sequential(*layers)
        self.num_features = prev
        self.num_classes = num_classes
        self.head = nn.Linear(prev, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x[0].numel() != self.in_features:
            raise ImageRecError(
                f"mlp was built for {self.in_chans}x{self.img_size}x{self.img_size} inputs but got "
                f"{'x'.join(map(str, x.shape[1:]))}: resize the images or rebuild it with the matching img_size/in_chans"
            )
        return self.blocks(x.flatten(1))  # (B, C*H*W) -> (B, num_features)


@register_model("mlp")
def mlp(num_classes: int, in_chans: int = 3, img_size: int = 224, **kwargs: Any) -> nn.Module:
    """Multi-layer perceptron on flattened pixels (512-256), a baseline."""
    return MLP(num_classes, in_chans, img_size, **kwargs)
