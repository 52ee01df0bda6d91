"""Transforms, split the fastai way: item transforms (decode-side, per image, in workers) and
batch transforms (per batch, on the device, on uint8 tensors where possible).

`base_transform(cfg)` is the deterministic part shared by training, eval, predict and serve:
resize -> center crop -> preprocessing ops -> uint8 tensor. Normalisation happens on the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as F

from imagerec.config import PreprocessConfig, resolve_mixing
from imagerec.utils import ImageRecError, did_you_mean

_INTERP = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
}

# --- preprocessing ops (the seeds' enhancement ops), part of the frozen config -------------------


def _median(img: Image.Image, k: float) -> Image.Image:
    return img.filter(ImageFilter.MedianFilter(int(k)))


def _gaussian(img: Image.Image, sigma: float) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(sigma))


def _equalize(img: Image.Image) -> Image.Image:
    return ImageOps.equalize(img)


def _clahe(img: Image.Image, clip: float) -> Image.Image:
    # CLAHE on the luminance only, so colours are kept.
    clahe = cv2.createCLAHE(clipLimit=clip, tileGridSize=(8, 8))
    if img.mode == "L":
        return Image.fromarray(clahe.apply(np.asarray(img)))
    lab = cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2LAB)
    lab[..., 0] = clahe.apply(lab[..., 0])
    return Image.fromarray(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB))


def _grayscale(img: Image.Image) -> Image.Image:
    return img if img.mode == "L" else img.convert("L").convert(img.mode)


def _sobel(img: Image.Image) -> Image.Image:
    # float64 gradients (exact for 8-bit input), magnitude by numpy and rounding, not truncation:
    # cv2.magnitude in float32 takes SIMD or scalar paths by the buffer's alignment, and the same
    # image came out 1 level apart in the RAM cache and in eval (189 of 200 digits differ by
    # alignment on an AVX2 machine; with these steps, none of 500)
    gray = np.asarray(img.convert("L"), dtype=np.float64)
    gx, gy = cv2.Sobel(gray, cv2.CV_64F, 1, 0), cv2.Sobel(gray, cv2.CV_64F, 0, 1)
    mag = np.sqrt(gx * gx + gy * gy)
    out = Image.fromarray(np.rint(mag / max(float(mag.max()), 1e-6) * 255).astype(np.uint8))
    return out if img.mode == "L" else out.convert(img.mode)


def _canny(img: Image.Image, low: float, high: float) -> Image.Image:
    out = Image.fromarray(cv2.Canny(np.asarray(img.convert("L")), low, high))
    return out if img.mode == "L" else out.convert(img.mode)


# name -> (function, default numeric arguments)
OPS: dict[str, tuple[Callable[..., Image.Image], tuple[float, ...]]] = {
    "median": (_median, (3,)),
    "gaussian": (_gaussian, (1.0,)),
    "equalize": (_equalize, ()),
    "clahe": (_clahe, (2.0,)),
    "grayscale": (_grayscale, ()),
    "sobel": (_sobel, ()),
    "canny": (_canny, (100.0, 200.0)),
}


def parse_op(spec: str) -> tuple[Callable[..., Image.Image], tuple[float, ...]]:
    """'median:5' -> (median filter, (5,)). Arguments are numbers separated by ':'."""
    name, *args = spec.strip().lower().split(":")
    if name not in OPS:
        raise ImageRecError(f"unknown preprocessing op '{name}': use one of {', '.join(OPS)}.{did_you_mean(name, OPS)}")
    fn, defaults = OPS[name]
    if len(args) > len(defaults):
        raise ImageRecError(f"op '{spec}': '{name}' takes at most {len(defaults)} argument(s)")
    try:
        values = tuple(float(a) for a in args) + defaults[len(args):]
    except ValueError as e:
        raise ImageRecError(f"op '{spec}': arguments must be numbers, e.g. median:5 or canny:50:150") from e
    problem = _bad_op_args(name, values)
    if problem:
        raise ImageRecError(f"op '{spec}': {problem}")
    return fn, values


def _bad_op_args(name: str, values: tuple[float, ...]) -> str | None:
    """Why these arguments are out of range for op `name`, or None when they are fine."""
    if not all(math.isfinite(v) for v in values):
        return "arguments must be finite numbers"
    if name == "median":
        k = values[0]
        if k != int(k) or k < 3 or int(k) % 2 == 0 or k > 99:
            return f"the median kernel size must be an odd whole number from 3 to 99 (3, 5, 7, ...), got {k:g}"
    elif name == "gaussian" and not 0 < values[0] <= 100:
        return f"the gaussian sigma must be > 0 and at most 100 pixels, got {values[0]:g}"
    elif name == "clahe" and not 0 < values[0] <= 1000:
        return f"the clahe clip limit must be > 0 (2 to 4 is usual) and at most 1000, got {values[0]:g}"
    elif name == "canny":
        low, high = values
        if not 0 <= low < high:
            return f"canny thresholds must satisfy 0 <= low < high (e.g. canny:100:200), got low {low:g}, high {high:g}"
    return None


def apply_ops(img: Image.Image, ops: tuple[str, ...] | list[str]) -> Image.Image:
    for spec in ops:
        fn, args = parse_op(spec)
        img = fn(img, *args)
    return img


# --- the deterministic base transform (shared by train, eval, predict, serve) -----------------------


def _resize_crop_of_long_image(img: Image.Image, resize: int, size: int, interp: InterpolationMode) -> Image.Image | None:
    """Resize-short-side-then-centre-crop of an image of extreme aspect ratio (over 4:1), computed
    on the cropped region only; None for any other image (it takes the usual two steps).

    Resizing the short side of a 1 x 1,600,000 strip to 256 would make it 256 x 409,600,000 pixels
    (GBs, for a 2 KB PNG under any pixel limit) only for the crop to keep 256 x 256 of it. PIL's
    `resize(box=...)` resamples just the source region behind the crop, with the geometry of the
    two steps as torchvision does them (its output size, long side truncated, and its crop offsets),
    the same scale and filter, reading source pixels beyond the box. It is close to the two steps,
    not equal to them: bilinear (the default) is within 1 level of them; nearest may pick the
    neighbouring source pixel (the box coordinates are single-precision floats in PIL); bicubic and
    lanczos can differ by tens of levels on noisy pixels, because PIL resamples in two separable
    passes, rounding and clipping to 0-255 in between, and may run the passes in the other order
    for the box than for the whole image. Train, eval, predict and serve all take this path, so a
    model sees its long images prepared one way everywhere; changing it would change what existing
    models were trained on.
    """
    w, h = img.size
    short, long_ = min(w, h), max(w, h)
    if resize < size or long_ * resize / short <= 4 * resize:
        return None
    new_long = int(resize * long_ / short)
    nw, nh = (resize, new_long) if w <= h else (new_long, resize)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return img.resize((size, size), TF.pil_modes_mapping[interp], box=box)


def base_transform(cfg: PreprocessConfig, size: int | None = None, resize: int | None = None,
                   with_ops: bool = True) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image (already in cfg.channels) -> uint8 tensor (C, size, size).

    Eval/predict use the defaults (resize to cfg.resize_size, crop cfg.input_size); training on
    large images uses a bigger square base that random-resized-crop then samples from, and runs
    the ops after that crop (`with_ops=False` here; `train_transforms`).
    """
    size = size or cfg.input_size
    resize = resize or (cfg.resize_size if size == cfg.input_size else size)
    interp = _INTERP[cfg.interpolation]
    ops = tuple(cfg.ops) if with_ops else ()
    for spec in ops:
        parse_op(spec)  # fail early on a bad op

    def run(img: Image.Image) -> torch.Tensor:
        cropped = _resize_crop_of_long_image(img, resize, size, interp)
        if cropped is not None:
            img = cropped
        elif min(img.size) != resize:
            img = F.resize(img, [resize], interpolation=interp, antialias=True)
        if img.size != (size, size):
            img = F.center_crop(img, [size, size])
        if ops:
            img = apply_ops(img, ops)
        return F.pil_to_tensor(img)  # (C, H, W) uint8

    return run


def normalize_batch(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 normalised, in one fused expression."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1) * 255.0
    return (x.float() - m) / s


# --- augmentation presets ----------------------------------------------------------------------------


def is_small(cfg: PreprocessConfig) -> bool:
    return cfg.input_size <= 64


def random_crops(cfg: PreprocessConfig, preset: str) -> bool:
    """Whether training takes a random resized crop (images > 64 px, any preset but none)."""
    return not is_small(cfg) and preset != "none"


def train_base_size(cfg: PreprocessConfig, preset: str) -> int:
    """The square size training images are stored at before augmentation."""
    return cfg.resize_size if random_crops(cfg, preset) else cfg.input_size


class _ApplyOps:
    """The preprocessing ops on a uint8 tensor (C, H, W), through PIL as in `base_transform`."""

    def __init__(self, ops: tuple[str, ...]) -> None:
        for spec in ops:
            parse_op(spec)  # fail early on a bad op
        self.ops = ops

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return F.pil_to_tensor(apply_ops(F.to_pil_image(t), self.ops))


def item_augment(cfg: PreprocessConfig, preset: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Per-image v2 augmentation on a uint8 tensor (C, base, base) -> (C, input, input), or None.

    With a random resized crop, the base holds the images without their ops, which run right after
    the crop, on the input_size image as in eval (resize, crop, ops): run on the base, the crop
    would resample the ops' output (canny's 1-px edges blurred to grey) at a random scale. Use it
    with `train_transforms`' base, which leaves the ops out exactly then."""
    interp = _INTERP[cfg.interpolation]
    ops: list[Callable] = []
    if random_crops(cfg, preset):
        scale = {"light": (0.35, 1.0), "standard": (0.08, 1.0), "strong": (0.08, 1.0)}[preset]
        ops.append(v2.RandomResizedCrop(cfg.input_size, scale=scale, interpolation=interp, antialias=True))
        if cfg.ops:
            ops.append(_ApplyOps(tuple(cfg.ops)))
        if preset in ("standard", "strong") and cfg.channels == 3:
            ops.append(v2.ColorJitter(0.3, 0.3, 0.3))
    if preset == "strong":
        ops.append(v2.TrivialAugmentWide(interpolation=interp))
    return v2.Compose(ops) if ops else None


def train_transforms(cfg: PreprocessConfig, preset: str) -> tuple[int, Callable[[Image.Image], torch.Tensor],
                                                                   Callable[[torch.Tensor], torch.Tensor] | None]:
    """(base size, base transform, per-item augmentation) of a training loader. The base is what a
    RAM cache holds; the ops run in the base, or after the random crop when there is one."""
    size = train_base_size(cfg, preset)
    return size, base_transform(cfg, size=size, with_ops=not random_crops(cfg, preset)), item_augment(cfg, preset)


class MultiHotMix:
    """MixUp or CutMix (one of them per batch at random, as v2.RandomChoice picks) for multi-label
    batches: the targets are multi-hot floats (B, K), which torchvision's MixUp/CutMix (class indices
    only) do not take. A mixed image's targets are the same blend of both images' label sets, soft
    targets that the BCE loss takes as they are. Sampling follows torchvision's: lambda ~ Beta(alpha,
    alpha), each image mixed with the one before it in the batch, CutMix's lambda corrected to the
    pasted box's area."""

    def __init__(self, mixup: float, cutmix: float) -> None:
        self.kinds = [(kind, torch.distributions.Beta(torch.tensor([a]), torch.tensor([a])))
                      for kind, a in (("mixup", mixup), ("cutmix", cutmix)) if a > 0]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kind, beta = self.kinds[int(torch.randint(len(self.kinds), ()))]
        lam = float(beta.sample())
        x_other, y_other = x.roll(1, 0), y.roll(1, 0)
        if kind == "mixup":
            x = x * lam + x_other * (1.0 - lam)
        else:
            h, w = x.shape[-2:]
            cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
            r = 0.5 * math.sqrt(1.0 - lam)
            y0, y1 = max(cy - int(r * h), 0), min(cy + int(r * h), h)
            x0, x1 = max(cx - int(r * w), 0), min(cx + int(r * w), w)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x_other[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
        return x, y * lam + y_other * (1.0 - lam)


def check_cutout(cutout: int, input_size: int) -> None:
    """Refuse a cutout square as large as the model input: it would blank every training image."""
    if cutout >= input_size:
        raise ImageRecError(f"--cutout {cutout} is not smaller than the model's {input_size}x{input_size} px input "
                            f"(the run's image size): it would blank every training image. Give a --cutout below "
                            f"{input_size} (airbench uses 12 for 32 px, e.g. {max(1, input_size * 3 // 8)} here) or 0 for none")


class BatchAugment:
    """Random translate (pad + crop), horizontal flip and cutout on a uint8 batch, per sample, vectorised
    (airbench's batch_crop/batch_flip_lr/batch_cutout); random erasing and mixup/cutmix after normalisation.
    `mixup`/`cutmix`: alphas, None for the preset's own, 0 for off (`config.resolve_mixing`)."""

    def __init__(self, cfg: PreprocessConfig, preset: str, hflip: bool | None, mixup: float | None = None,
                 cutmix: float | None = None, translate: int | None = None, cutout: int = 0) -> None:
        small = is_small(cfg)
        check_cutout(cutout, cfg.input_size)
        self.cutout = cutout
        # airbench fills the square with 0 after normalisation, i.e. with the mean colour.
        self.fill = torch.tensor([round(m * 255) for m in cfg.mean], dtype=torch.uint8)
        self.pad = max(1, cfg.input_size // 8) if small and preset != "none" else 0
        if translate is not None:
            self.pad = translate
        self.flip = (preset in ("standard", "strong")) if hflip is None else hflip
        self.erase = v2.RandomErasing(p=0.25, value=0) if preset == "strong" else None
        mixup, cutmix = resolve_mixing(preset, mixup, cutmix)
        self.mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
        if cfg.multi_label and (mixup > 0 or cutmix > 0):
            self.mix = MultiHotMix(mixup, cutmix)
        elif mixup > 0 or cutmix > 0:
            mixers = [v2.MixUp(alpha=mixup, num_classes=cfg.num_classes)] if mixup > 0 else []
            mixers += [v2.CutMix(alpha=cutmix, num_classes=cfg.num_classes)] if cutmix > 0 else []
            self.mix = v2.RandomChoice(mixers)

    def geometric(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> same shape, each sample shifted/flipped by its own draw."""
        b, _, h, w = x.shape
        if self.pad:
            p = self.pad
            padded = torch.nn.functional.pad(x, (p, p, p, p), mode="replicate") if x.is_floating_point() else \
                torch.nn.functional.pad(x.float(), (p, p, p, p), mode="replicate").to(x.dtype)
            dy = torch.randint(0, 2 * p + 1, (b,), device=x.device)
            dx = torch.randint(0, 2 * p + 1, (b,), device=x.device)
            rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
            cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
            bi = torch.arange(b, device=x.device)[:, None, None, None]
            ci = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
            x = padded[bi, ci, rows, cols]
        if self.flip:
            mask = torch.rand(b, device=x.device) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(-1), x)
        if self.cutout:
            x = self._cut(x)
        return x

    def _cut(self, x: torch.Tensor) -> torch.Tensor:
        """One `cutout`-sided square per sample, inside the image (airbench96's make_random_square_masks)."""
        b, _, h, w = x.shape
        s = self.cutout
        top = torch.randint(0, h - s + 1, (b, 1, 1, 1), device=x.device)
        left = torch.randint(0, w - s + 1, (b, 1, 1, 1), device=x.device)
        ys = torch.arange(h, device=x.device).view(1, 1, h, 1) - top
        xs = torch.arange(w, device=x.device).view(1, 1, 1, w) - left
        inside = (ys >= 0) & (ys < s) & (xs >= 0) & (xs < s)  # (B, 1, H, W)
        return torch.where(inside, self.fill.to(x.device, x.dtype).view(1, -1, 1, 1), x)  # batches are 0-255 scale

    def after_normalize(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.erase is not None:
            x = torch.stack([self.erase(xi) for xi in x])
        if self.mix is not None and x.shape[0] > 1:
            x, y = self.mix(x, y)
        return x, y
