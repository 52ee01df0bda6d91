"""`resnet18` / `resnet50`: timm ResNets, with a CIFAR-style stem for small images."""

from __future__ import annotations

from typing import Any

import timm
from torch import nn

from imagerec.models._registry import register_model

SMALL_IMAGE_MAX = 64


def _create_resnet(name: str, num_classes: int, in_chans: int, img_size: int, **kwargs: Any) -> nn.Module:
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if img_size <= SMALL_IMAGE_MAX:
        # The 7x7/2 conv + 3x3/2 max pool shrink a 32px image to 8px before the first block;
        # a 3x3/1 stem without the pool keeps the resolution, as in the CIFAR ResNets.
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    return model


@register_model("resnet18")
def resnet18(num_classes: int, in_chans: int = 3, img_size: int = 224, **kwargs: Any) -> nn.Module:
    """ResNet-18 (timm); 3x3 stem without max pool for images <= 64px."""
    return _create_resnet("resnet18", num_classes, in_chans, img_size, **kwargs)


@register_model("resnet50")
def resnet50(num_classes: int, in_chans: int = 3, img_size: int = 224, **kwargs: Any) -> nn.Module:
    """ResNet-50 (timm); 3x3 stem without max pool for images <= 64px."""
    return _create_resnet("resnet50", num_classes, in_chans, img_size, **kwargs)
