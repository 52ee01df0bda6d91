"""Small plain conv nets for MNIST/CIFAR-size inputs: `cnn` and `cnn-large`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from imagerec.models._registry import register_model
from imagerec.models.base import Classifier
from imagerec.utils import ImageRecError


def conv_bn_relu(in_chans: int, out_chans: int) -> nn.Sequential:
    # No conv bias: the BatchNorm right after it has its own shift.
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_chans),
        nn.ReLU(inplace=True),
    )


class Residual(nn.Module):
    """`x + block(x)`."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ConvNet(Classifier):
    """Stem conv, then per stage conv -> max-pool (-> optional residual conv), then global max pool.

    Global *max* pooling rather than average: on small digit/object images the evidence is a
    few strong local activations, and max pooling trains faster there (airbench uses it too).
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        widths: Sequence[int] = (32, 64, 128),
        residual: bool = False,
    ) -> None:
        super().__init__()
        if not widths or any(int(w) <= 0 for w in widths):
            raise ImageRecError(f"widths={tuple(widths)!r} is not valid: give positive channel counts, e.g. (32, 64, 128)")
        widths = [int(w) for w in widths]
        self.stem = conv_bn_relu(in_chans, widths[0])
        stages: list[nn.Module] = []
        prev = widths[0]
        for w in widths:
            layers: list[nn.Module] = [conv_bn_relu(prev, w), nn.MaxPool2d(2)]
            if residual:
                layers.append(Residual(conv_bn_relu(w, w)))
            stages.append(nn.Sequential(*layers))
            prev = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.num_features = prev
        self.num_classes = num_classes
        self.head = nn.Linear(prev, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))  # (B, C, H / 2^n, W / 2^n)
        return self.pool(x).flatten(1)  # (B, C)


def _check_size(name: str, img_size: int, widths: Sequence[int]) -> None:
    """Refuse an input that the stages' 2x poolings bring below 1 px: it failed at the first forward pass with
    PyTorch's "Output size is too small" traceback, naming no size or flag."""
    smallest = 2 ** len(tuple(widths))
    if img_size < smallest:
        raise ImageRecError(f"{name} with {len(tuple(widths))} stages halves its input {len(tuple(widths))} times, "
                            f"which leaves nothing of {img_size} px images: use --image-size {smallest} or more, "
                            f"fewer widths, or --model mlp")


@register_model("cnn")
def cnn(num_classes: int, in_chans: int = 3, img_size: int = 224, **kwargs: Any) -> nn.Module:
    """Small fast conv net (3 stages, 32-64-128) for MNIST/CIFAR-size images."""
    widths = kwargs.pop("widths", (32, 64, 128))
    _check_size("cnn", img_size, widths)
    return ConvNet(num_classes, in_chans, widths=widths, residual=False, **kwargs)


@register_model("cnn-large")
def cnn_large(num_classes: int, in_chans: int = 3, img_size: int = 224, **kwargs: Any) -> nn.Module:
    """Wider residual conv net (64-128-256, two convs a stage) for CIFAR-like images."""
    widths = kwargs.pop("widths", (64, 128, 256))
    _check_size("cnn-large", img_size, widths)
    return ConvNet(num_classes, in_chans, widths=widths, residual=True, **kwargs)
