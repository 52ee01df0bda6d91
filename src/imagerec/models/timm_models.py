"""Any timm architecture as `timm/<name>`, built from scratch (weights come via `load_pretrained`)."""

from __future__ import annotations

from typing import Any

import timm
import torch
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
        model = timm.create_model(name, img_size=img_size, **common)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
        model = timm.create_model(name, **common)
    check_input_size(model, f"timm/{name}", in_chans, img_size)
    return model


def check_input_size(model: nn.Module, label: str, in_chans: int, img_size: int) -> None:
    """One forward pass of a blank image (eval mode, no gradients): a net that downsamples more than
    `img_size` allows fails here with a message naming --image-size, not at the first training step
    with a convolution's traceback (timm/convnext_atto on 28 px digits)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, img_size, img_size))
    except RuntimeError as e:
        raise ImageRecError(
            f"{label} cannot take {in_chans}x{img_size}x{img_size} images ({str(e).splitlines()[0][:200]}): it "
            f"downsamples more than {img_size} px allows; use a larger --image-size (e.g. 64 or 224) or another --model"
        ) from e
    finally:
        model.train(was_training)
