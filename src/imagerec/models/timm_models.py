"""Any timm architecture as `timm/<name>`, built from scratch (weights come via `load_pretrained`)."""

from __future__ import annotations

from typing import Any

import timm
from torch import nn

from imagerec.utils import ImageRecError, did_you_mean


def create_timm_model(name: str, num_classes: int, in_chans: int = 3, img_size: int = 224, **kwargs: Any) -> nn.Module:
    """Build timm architecture `name`, passing `img_size` only to models that take it.

    Example:
        >>> model = create_timm_model("resnet10t", num_classes=10, in_chans=1, img_size=28)
    """
    if not timm.is_model(name):
        raise ImageRecError(
            f"unknown timm model '{name}'.{did_you_mean(name, timm.list_models())} "
            f"Run python -c \"import timm; print(timm.list_models('*{name[:4]}*'))\" to list close names."
        )
    # Never let timm fetch weights itself: pretrained weights go through load_pretrained (safetensors only).
    if kwargs.pop("pretrained", False):
        raise ImageRecError(
            f"timm/{name} is built without weights: load them with "
            f"load_pretrained(model, 'hf-hub:timm/{name}') or a local .safetensors file"
        )
    common = dict(pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    try:
        # ViT-like models size their position embeddings from img_size; CNNs reject the argument.
        return timm.create_model(name, img_size=img_size, **common)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
    return timm.create_model(name, **common)
