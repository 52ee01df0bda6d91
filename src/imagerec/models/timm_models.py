"""Any timm architecture as `timm/<name>`, built from scratch (weights come via `load_pretrained`)."""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from typing import Any

import timm
import torch
from timm.layers import PatchEmbed
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
    patch_embed = getattr(model, "patch_embed", None)
    # Refused even with dynamic_img_pad=True: timm then pads at run time, but sizes the position
    # embedding from the floored grid, so the padded image no longer fits it.
    if isinstance(patch_embed, PatchEmbed):
        step = math.lcm(*patch_embed.patch_size)
        check_patch_multiple(f"timm/{name}", img_size, lambda size: step)
    check_input_size(model, f"timm/{name}", in_chans, img_size)
    return model


# Off while a saved run's model is rebuilt (`trained_models_allowed`): a run trained before the check
# (session 21) at such a size keeps loading for eval, predict and export; new training is refused.
_CHECK_PATCHES = contextvars.ContextVar("imagerec_check_patches", default=True)


@contextlib.contextmanager
def trained_models_allowed() -> Iterator[None]:
    """Rebuild an already-trained model as it was trained: no refusal of its input size's partial patches."""
    token = _CHECK_PATCHES.set(False)
    try:
        yield
    finally:
        _CHECK_PATCHES.reset(token)


def check_patch_multiple(label: str, img_size: int, patch_for: Callable[[int], int]) -> None:
    """Refuse an `img_size` that is not a whole number of patches: a patch embedding (a conv whose
    stride is its size) silently drops the pixels past the last whole patch, in training, eval and
    predict (28 px into 16 px patches: only the top-left 16x16 is seen). `patch_for(size)` is the
    patch size the model would use at `size`."""
    patch = patch_for(img_size)
    if img_size % patch == 0 or not _CHECK_PATCHES.get():
        return
    lower = next((s for s in range(img_size - 1, 0, -1) if s % patch_for(s) == 0), None)
    upper = next(s for s in range(img_size + 1, 2 * img_size + 2 * patch) if s % patch_for(s) == 0)
    sizes = f"{lower} or {upper}" if lower is not None else str(upper)
    raise ImageRecError(
        f"{label} cuts {img_size}x{img_size} images into {patch}x{patch} px patches, which would silently drop the "
        f"last {img_size % patch} px rows and columns of every image: use --image-size {sizes} "
        f"(a multiple of {patch} px), or another --model"
    )


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
