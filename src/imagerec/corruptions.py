"""Common image corruptions at five severities, CIFAR-10-C style, on preprocessed uint8 batches.

The corruptions and their severity parameters are those of Hendrycks & Dietterich 2019
("Benchmarking Neural Network Robustness to Common Corruptions and Perturbations"), as defined
for 32 px images in `make_cifar_c.py` of github.com/hendrycks/robustness (the CIFAR-10-C script;
the motion-blur parameters are the "cifar" scale of bethgelab/imagecorruptions, which ports the
ImageMagick motion blur to numpy). Sizes that the script hard-codes as 32 px scale with the image
here. They run on what the model sees (the eval transform's output), batched in torch.

Left out: glass blur (a per-pixel Python swap loop), frost (needs the benchmark's frost photos),
snow and spatter (ImageMagick-era layers), elastic transform, and saturate (not defined on
grayscale and not monotone in severity).

Randomness comes only from `seed`: one seed gives the same noise at every severity, so a
stronger severity is the same draw, scaled up.

Example:
    >>> out = corrupt(batch, "gaussian_noise", severity=3, seed=0)   # uint8 (B, C, H, W)
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from imagerec.utils import ImageRecError, did_you_mean, mix_seed

SEVERITIES = (1, 2, 3, 4, 5)

# --- parameters, per severity 1..5 (make_cifar_c.py) ----------------------------------------------
GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)  # std of additive noise on [0, 1]
SHOT_NOISE = (500, 250, 100, 75, 50)  # photons per unit intensity (Poisson); fewer = noisier
IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)  # fraction of values set to 0 or 1
SPECKLE_NOISE = (0.06, 0.10, 0.12, 0.16, 0.20)  # std of multiplicative noise
GAUSSIAN_BLUR = (0.4, 0.6, 0.7, 0.8, 1.0)  # sigma in pixels
DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))  # (disk radius, alias blur)
# (radius, sigma), random angle in +-45 deg. As in ImageMagick, the kernel is 2 * radius + 1 taps of a
# one-sided Gaussian: with sigma 2 the taps past 12 weigh < 1e-9, so severities 3 and 4 blur alike.
MOTION_BLUR = ((6, 1.0), (6, 1.5), (6, 2.0), (8, 2.0), (9, 2.5))
ZOOM_BLUR = (1.06, 1.11, 1.16, 1.21, 1.26)  # zoom factors 1, 1.01, ... below this, averaged
FOG = ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))  # (strength, plasma wibble decay)
BRIGHTNESS = (0.05, 0.10, 0.15, 0.20, 0.30)  # added to the HSV value channel
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)  # factor on the distance to the per-channel mean
JPEG = (80, 65, 58, 50, 40)  # JPEG quality
PIXELATE = (0.95, 0.90, 0.85, 0.75, 0.65)  # box-downscale factor, then box-upscale back


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _filter(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Correlate every channel of (B, C, H, W) with one (kh, kw) kernel, or with a kernel per
    image when `kernel` is (B, kh, kw). `mode`: 'reflect' (cv2's default border) or 'replicate'."""
    b, c, h, w = x.shape
    kh, kw = kernel.shape[-2:]
    ph, pw = kh // 2, kw // 2
    if mode == "reflect" and (ph >= h or pw >= w):
        mode = "replicate"  # reflect padding needs the image to be wider than the pad
    xp = F.pad(x.reshape(1, b * c, h, w), (pw, pw, ph, ph), mode=mode)
    weight = kernel.to(x.dtype).reshape(-1, 1, kh, kw)
    weight = weight.repeat_interleave(c, dim=0) if weight.shape[0] == b else weight.expand(b * c, 1, kh, kw)
    return F.conv2d(xp, weight, groups=b * c).reshape(b, c, h, w)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    # Radius int(4 sigma + 0.5): scipy/skimage's gaussian filter (truncate=4), which the script uses.
    r = int(4 * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k1 = torch.exp(-(t**2) / (2 * sigma**2))
    k1 /= k1.sum()
    return (k1[:, None] * k1[None, :]).float()


def _disk(radius: float, alias_blur: float) -> torch.Tensor:
    """make_cifar_c.py's `disk`: an aliased disk on a 17x17 grid (radius <= 8), anti-aliased by a
    3x3 Gaussian."""
    size = 8 if radius <= 8 else math.ceil(radius)
    ksize = (3, 3) if radius <= 8 else (5, 5)
    L = np.arange(-size, size + 1)
    X, Y = np.meshgrid(L, L)
    disk = np.array((X**2 + Y**2) <= radius**2, dtype=np.float32)
    disk /= disk.sum()
    return torch.from_numpy(cv2.GaussianBlur(disk, ksize=ksize, sigmaX=alias_blur))


# --- the corruptions: float (B, C, H, W) in [0, 1] -> same, before clipping --------------------------


def _gaussian_noise(x: torch.Tensor, s: int, seed: int) -> torch.Tensor:
    return x + torch.randn(x.shape, generator=_generator(seed)) * GAUSSIAN_NOISE[s - 1]


def _shot_noise(x: torch.Tensor, s: int, seed: int) -> torch.Tensor:
    c = SHOT_NOISE[s - 1]
    return torch.poisson(x * c, generator=_generator(seed)) / c


def _impulse_noise(x: torch.Tensor, s: int, seed: int) -> torch.Tensor:
    # skimage random_noise(mode='s&p'): each value becomes 0 or 1 (even odds) with probability `amount`.
    g = _generator(seed)
    hit = torch.rand(x.shape, generator=g) < IMPULSE_NOISE[s - 1]
    salt = (torch.rand(x.shape, generator=g) < 0.5).to(x.dtype)
    return torch.where(hit, salt, x)


def _speckle_noise(x: torch.Tensor, s: int, seed: int) -> torch.Tensor:
    return x + x * torch.randn(x.shape, generator=_generator(seed)) * SPECKLE_NOISE[s - 1]


def _gaussian_blur(x: torch.Tensor, s: int, seed: int) -> torch.Tensor:
    return _filter(x, _gaussian_kernel(GAUSSIAN_BLUR[s - 1]), "replicate")  # skimage mode='nearest'


def _defocus_blur(x: torch.Tensor, s: int, seed: int) -> torch.Tensor:
    return _filter(x, _disk(*DEFOCUS_BLUR[s - 1]), "reflect")  # cv2.filter2D's border


def _motion_kernels(radius: int, sigma: float, angles: np.ndarray, h: int, w: int) -> torch.Tensor:
    """(B, K, K) kernels of imagecorruptions' `_motion_blur`: the image shifted by 0..2r pixels
    along the angle, weighted by a one-sided Gaussian, edges replicated."""
    width = 2 * radius + 1
    weights = np.exp(-(np.arange(width) ** 2) / (2 * sigma**2))
    weights /= weights.sum()
    r = width - 1  # the largest shift
    kernels = np.zeros((len(angles), 2 * r + 1, 2 * r + 1), dtype=np.float32)
    for b, angle in enumerate(np.deg2rad(angles)):
        for i in range(width):
            dy = -math.ceil(i * math.sin(angle) - 0.5)
            dx = -math.ceil(i * math.cos(angle) - 0.5)
            if abs(dy) >= h or abs(dx) >= w:
                break  # the motion left the image
            kernels[b, r - dy, r - dx] += weights[i]  # output(y, x) += w_i * image(y - dy, x - dx)
    return torch.from_numpy(kernels)


def _motion_blur(x: torch.Tensor, s: int, seed: int) -> torch.Tensor:
    angles = np.random.default_rng(seed).uniform(-45, 45, size=x.shape[0])
    return _filter(x, _motion_kernels(*MOTION_BLUR[s - 1], angles, *x.shape[-2:]), "replicate")


def _clipped_zoom(x: torch.Tensor, z: float) -> torch.Tensor:
    """make_cifar_c.py's clipped_zoom: the centre crop of h/z zoomed by z as scipy.ndimage.zoom
    (order=1) does it, to round(crop * z) pixels with corners aligned, then the centre h x w of that.
    (Resizing the crop straight to h x w zoomed less: at 32 px, 1.02x and 1.03x did not zoom at all.)"""
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / z), math.ceil(w / z)
    top, left = (h - ch) // 2, (w - cw) // 2
    zh, zw = round(ch * z), round(cw * z)  # scipy.ndimage.zoom's output size (>= h, w)
    zoomed = F.interpolate(x[..., top : top + ch, left : left + cw], size=(zh, zw), mode="bilinear", align_corners=True)
    trim_top, trim_left = (zh - h) // 2, (zw - w) // 2
    return zoomed[..., trim_top : trim_top + h, trim_left : trim_left + w]


def _zoom_blur(x: torch.Tensor, s: int, seed: int) -> torch.Tensor:
    """Mean of the image and its centre crops zoomed back to full size (1.00x, 1.01x, 1.02x, ...)."""
    factors = np.arange(1, ZOOM_BLUR[s - 1], 0.01)
    out = x.clone()
    for z in factors:
        out += _clipped_zoom(x, float(z))
    return out / (len(factors) + 1)


def _plasma_fractal(n: int, mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """(n, mapsize, mapsize) diamond-square height maps in [0, 1]: make_cifar_c.py's plasma_fractal,
    batched over the first axis."""
    maparray = np.zeros((n, mapsize, mapsize))
    stepsize, wibble = mapsize, 100.0

    def wibbledmean(array: np.ndarray) -> np.ndarray:
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        # squares: the centre of each square of corners gets their mean plus a random wobble
        corners = maparray[:, 0:mapsize:stepsize, 0:mapsize:stepsize]
        acc = corners + np.roll(corners, -1, axis=1)
        acc = acc + np.roll(acc, -1, axis=2)
        maparray[:, half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(acc)
        # diamonds: edge midpoints from the two neighbouring centres and corners
        dr = maparray[:, half:mapsize:stepsize, half:mapsize:stepsize]
        ul = maparray[:, 0:mapsize:stepsize, 0:mapsize:stepsize]
        lt = dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=2)
        maparray[:, 0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(lt)
        tt = dr + np.roll(dr, 1, axis=2) + ul + np.roll(ul, -1, axis=1)
        maparray[:, half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(tt)
        stepsize //= 2
        wibble /= wibbledecay
    maparray -= maparray.min(axis=(1, 2), keepdims=True)
    return maparray / np.maximum(maparray.max(axis=(1, 2), keepdims=True), 1e-12)


def _fog(x: torch.Tensor, s: int, seed: int) -> torch.Tensor:
    strength, decay = FOG[s - 1]
    b, _, h, w = x.shape
    mapsize = 1 << (max(h, w, 2) - 1).bit_length()  # the next power of two (the script's is 32)
    plasma = _plasma_fractal(b, mapsize, decay, np.random.default_rng(seed))[:, None, :h, :w]
    max_val = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x + strength * torch.from_numpy(plasma).to(x.dtype)) * max_val / (max_val + strength)


def _brightness(x: torch.Tensor, s: int, seed: int) -> torch.Tensor:
    # +c on HSV value with hue and saturation kept = RGB scaled by V'/V (grey V' where V = 0).
    c = BRIGHTNESS[s - 1]
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + c).clamp(max=1.0)
    return torch.where(v > 0, x * v_new / v.clamp(min=1e-12), v_new)


def _contrast(x: torch.Tensor, s: int, seed: int) -> torch.Tensor:
    means = x.mean(dim=(2, 3), keepdim=True)
    return (x - means) * CONTRAST[s - 1] + means


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255.0).round().to(torch.uint8)


def _per_image(x: torch.Tensor, fn: Callable[[Image.Image], Image.Image]) -> torch.Tensor:
    """Apply a PIL function to each image of a float batch (B, C, H, W) in [0, 1] (C = 1 or 3)."""
    u = _to_uint8(x).permute(0, 2, 3, 1).numpy()  # (B, H, W, C)
    out = [np.array(fn(Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img))) for img in u]
    return torch.from_numpy(np.stack(out)).reshape(u.shape).permute(0, 3, 1, 2).float() / 255.0


def _jpeg_compression(x: torch.Tensor, s: int, seed: int) -> torch.Tensor:
    def jpeg(img: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=JPEG[s - 1])  # PIL's encoder, as the script
        return Image.open(buf)

    return _per_image(x, jpeg)


def _pixelate(x: torch.Tensor, s: int, seed: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    small = (max(1, int(w * PIXELATE[s - 1])), max(1, int(h * PIXELATE[s - 1])))
    return _per_image(x, lambda img: img.resize(small, Image.Resampling.BOX).resize((w, h), Image.Resampling.BOX))


CORRUPTIONS: dict[str, Callable[[torch.Tensor, int, int], torch.Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur,
    "defocus_blur": _defocus_blur,
    "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "jpeg_compression": _jpeg_compression,
    "pixelate": _pixelate,
}
CORRUPTION_NAMES = tuple(CORRUPTIONS)


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Corrupt a uint8 batch (B, C, H, W) (or one image (C, H, W)) with `name` at `severity` 1..5.

    Deterministic: the same images, name and seed give the same output. Every severity starts from
    the same seed, so severity 5 is the severity-1 noise scaled up, not a fresh draw.

    Example:
        >>> noisy = corrupt(batch, "shot_noise", 5, seed=0)
    """
    check_severities([severity])
    name = resolve_corruptions([name])[0]
    if images.dtype != torch.uint8:
        raise ImageRecError(f"corrupt() takes uint8 images (what the eval transform gives), got {images.dtype}")
    single = images.ndim == 3
    x = images[None] if single else images
    y = CORRUPTIONS[name](x.cpu().float() / 255.0, severity, mix_seed(seed, zlib.crc32(name.encode())))
    out = _to_uint8(y)
    return out[0] if single else out


def resolve_corruptions(names: Sequence[str] | None) -> list[str]:
    """The corruption names to run (None or ['all']: every one), checked, in the given order."""
    if names is None or list(names) == ["all"]:
        return list(CORRUPTION_NAMES)
    out = []
    for raw in names:
        name = raw.strip().lower().replace("-", "_")
        if name not in CORRUPTIONS:
            raise ImageRecError(f"unknown corruption '{raw}': use 'all' or some of {', '.join(CORRUPTION_NAMES)}."
                                f"{did_you_mean(name, CORRUPTION_NAMES)}")
        if name not in out:
            out.append(name)
    return out


def check_severities(severities: Sequence[int]) -> list[int]:
    """Severities as sorted unique ints, each in 1..5."""
    bad = [s for s in severities if s not in SEVERITIES]
    if bad or not severities:
        raise ImageRecError(f"severity {bad[0] if bad else '(none)'} is out of range: severities are 1 to 5, "
                            f"e.g. --severities 1..5 or --severities 3,5")
    return sorted({int(s) for s in severities})
