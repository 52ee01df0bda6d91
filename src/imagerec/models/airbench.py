"""`airbench`: the network of Keller Jordan's airbench94 (CIFAR-10 to 94% in seconds on a GPU),
sized for a CPU. It is the model of `--recipe fast`.

The tricks that make it train in few epochs, from airbench's file and paper:
- a frozen 2x2 **whitening** conv as the stem: its filters are the eigenvectors of the training
  images' 2x2 patch covariance scaled by 1/sqrt(eigenvalue), in +/- pairs (`init_from_data`);
- three conv groups `conv -> maxpool -> BN -> GELU -> conv -> BN -> GELU`, the convs
  dirac-initialised (each starts as a partial identity), BN with frozen scale (eps 1e-5 here:
  airbench's 1e-12 gave NaNs with the stride-2 stem, whose last maps are 1x1);
- global max pool, a bias-free linear head scaled by 1/9 (a temperature that suits label
  smoothing 0.2);
- **test-time augmentation** in eval mode: the logits averaged over the image, its mirror and
  one-pixel translations. Because the head is linear, averaging the pooled features gives the
  same logits, so `forward == forward_head(forward_features)` still holds, and the same TTA runs
  in eval, predict, export and serve. Mirror views are left out for images that must not be
  flipped (digits, text): `tta="translate"`. A run sets the TTA from its own training flips
  (`match_training_flips`: mirror views only if it trained on mirrored images) and records it in
  the checkpoint's model_kwargs; a checkpoint without one keeps the old default (mirrors on colour).

Widths: airbench94 uses (64, 256, 256), about 0.24 GFLOP per 32x32 image forward. On a CPU
without bf16 that is ~180 img/s of training on 2 cores; `--recipe fast` defaults to the width
that reaches the accuracy target soonest on such a machine (see README "Performance").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagerec.models._registry import register_model
from imagerec.models.base import Classifier
from imagerec.utils import ImageRecError

BN_EPS = 1e-5
TTA_MODES = ("none", "flip", "translate", "flip-translate")


class FrozenScaleBN(nn.BatchNorm2d):
    """BatchNorm with its scale fixed at 1 (only the shift trains), as in airbench."""

    def __init__(self, channels: int, momentum: float = 0.4) -> None:
        super().__init__(channels, eps=BN_EPS, momentum=momentum)
        self.weight.requires_grad_(False)


class DiracConv(nn.Conv2d):
    """3x3 'same' conv without bias whose first in_channels filters start as the identity."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__(in_chans, out_chans, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        w = self.weight.data
        nn.init.dirac_(w[: w.size(1)])


class ConvGroup(nn.Module):
    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        self.conv1 = DiracConv(in_chans, out_chans)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = FrozenScaleBN(out_chans)
        self.conv2 = DiracConv(out_chans, out_chans)
        self.norm2 = FrozenScaleBN(out_chans)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class ScaledLinear(nn.Linear):
    """airbench's head: a bias-free Linear whose output is scaled (1/9), the scale a plain attribute,
    so the state dict is a Linear's. The scale lives in the classifier, so `get_classifier()` of the
    features is the model's output and `reset_classifier(0)` leaves the plain features."""

    def __init__(self, in_features: int, out_features: int, scale: float) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


class AirbenchNet(Classifier):
    data_init_keys = ("whiten.weight",)  # the state `init_from_data` sets (kept when --pretrained supplies it)

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        widths: Sequence[int] = (64, 256, 256),
        tta: str = "flip-translate",
        head_scale: float = 1 / 9,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        if len(widths) != 3 or any(int(w) <= 0 for w in widths):
            raise ImageRecError(f"airbench widths={tuple(widths)!r}: give three positive channel counts, e.g. (64, 256, 256)")
        if tta not in TTA_MODES:
            raise ImageRecError(f"unknown tta '{tta}': use one of {', '.join(TTA_MODES)}")
        w1, w2, w3 = (int(w) for w in widths)
        whiten_width = 2 * in_chans * 2 * 2  # +/- pairs of the 2x2 patch eigenvectors
        self.whiten = nn.Conv2d(in_chans, whiten_width, kernel_size=2, stride=stem_stride, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.blocks = nn.Sequential(ConvGroup(whiten_width, w1), ConvGroup(w1, w2), ConvGroup(w2, w3))
        self.act = nn.GELU()
        self.tta, self.head_scale = tta, head_scale
        self.num_features, self.num_classes = w3, num_classes
        self.head = ScaledLinear(w3, num_classes, head_scale) if num_classes > 0 else nn.Identity()

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from normalised training images (B, C, H, W), a few thousand."""
        c, (h, w) = x.shape[1], self.whiten.weight.shape[2:]
        patches = x.float().unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c * h * w)  # (N, C*h*w)
        cov = patches.T @ patches / patches.shape[0]
        eigval, eigvec = torch.linalg.eigh(cov)
        eigval, eigvec = eigval.flip(0), eigvec.T.flip(0).reshape(-1, c, h, w)
        scaled = eigvec / torch.sqrt(eigval.clamp_min(0) + eps).view(-1, 1, 1, 1)
        self.whiten.weight.copy_(torch.cat([scaled, -scaled]).to(self.whiten.weight))

    def match_training_flips(self, hflip: bool) -> str:
        """Set the eval TTA to the training augmentation and return it (for the checkpoint's model_kwargs):
        mirror views only when the model trained on mirrored images. Averaging in the mirror of an image
        whose class depends on its orientation (arrows, text) votes for the wrong class."""
        self.tta = tta_for_training(hflip, self.tta)
        return self.tta

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.act(self.whiten(x)))  # (B, w3, h, w), h = w = 3 for 32px input
        return F.adaptive_max_pool2d(x, 1).flatten(1)  # (B, w3)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.tta == "none":
            return self._features(x)
        flips = "flip" in self.tta
        views = [x, x.flip(-1)] if flips else [x]
        feats = torch.stack([self._features(v) for v in views]).mean(0)
        if "translate" not in self.tta:
            return feats
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        h, w = x.shape[-2:]
        shifted = [padded[..., :h, :w], padded[..., 2:, 2:]]
        views = [v2 for v in shifted for v2 in ((v, v.flip(-1)) if flips else (v,))]
        moved = torch.stack([self._features(v) for v in views]).mean(0)
        return 0.5 * feats + 0.5 * moved  # airbench's weights: half the original views, half the shifts

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = ScaledLinear(self.num_features, num_classes, self.head_scale) if num_classes > 0 else nn.Identity()


def tta_for_training(hflip: bool, tta: str = "flip-translate") -> str:
    """`tta` with mirror views added or left out as training did (`hflip`); "none" stays "none"."""
    if tta == "none":
        return tta
    translate = "translate" in tta
    if hflip:
        return "flip-translate" if translate else "flip"
    return "translate" if translate else "none"


def default_widths(in_chans: int, img_size: int) -> tuple[tuple[int, int, int], int]:
    """(widths, stem stride): digit-sized grayscale images need far less than colour objects (measured, README)."""
    if in_chans == 1 and img_size <= 32:
        return (16, 32, 64), 2
    return (64, 128, 256), 1


def min_input_size(stem_stride: int) -> int:
    """The smallest square input that still leaves a 1x1 map after the stem and three 2x poolings."""
    side = 8  # the stem's output side that three 2x poolings bring to 1
    return (side - 1) * stem_stride + 2  # the 2x2 stem: out = (in - 2) // stride + 1


@register_model("airbench")
def airbench(num_classes: int, in_chans: int = 3, img_size: int = 224, **kwargs: Any) -> nn.Module:
    """airbench94's net (whitening stem, 3 conv groups, TTA in eval): the --recipe fast model."""
    widths, stride = default_widths(in_chans, img_size)
    widths = kwargs.pop("widths", None) or widths
    kwargs.setdefault("stem_stride", stride)
    smallest = min_input_size(int(kwargs["stem_stride"]))
    if img_size < smallest:
        raise ImageRecError(
            f"airbench needs {'grayscale' if in_chans == 1 else 'colour'} images of at least {smallest} px (its 2x2 stem"
            f"{' of stride 2' if kwargs['stem_stride'] == 2 else ''} and three 2x poolings leave nothing of {img_size} px): "
            f"use --image-size {smallest} or another --model, e.g. cnn")
    # The run records its TTA in model_kwargs (`match_training_flips`); checkpoints from before that
    # record none and keep the TTA they were evaluated with: mirror views on colour images only.
    tta = kwargs.pop("tta", "flip-translate" if in_chans == 3 else "translate")
    return AirbenchNet(num_classes, in_chans, widths, tta, **kwargs)


@register_model("airbench94")
def airbench94(num_classes: int, in_chans: int = 3, img_size: int = 224, **kwargs: Any) -> nn.Module:
    """`airbench` at airbench94's own widths (64-256-256, ~2.3x the FLOPs of the recipe's 64-128-256):
    the choice for a bf16 CPU's 20 minutes, `--recipe fast --model airbench94 --epochs 10` (README)."""
    kwargs.setdefault("widths", (64, 256, 256))
    return airbench(num_classes, in_chans, img_size, **kwargs)
