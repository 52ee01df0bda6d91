"""A run's data loaders, and what is read from its images before training: their geometry
(channels, native size), a uint8 sample and its mean/std, and the image counts a run reports
(exact, or "listed" while a streaming loader has not met every image yet)."""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import torch
from PIL import Image

from imagerec.config import PreprocessConfig, TrainConfig
from imagerec.data import DataSpec
from imagerec.data.decode import DECODE_ERRORS, ArrayRef, Source, TarMember, read_bytes
from imagerec.data.loader import ImageLoader, arrays_pass_through, default_workers, targets_tensor
from imagerec.engine import distributed
from imagerec.transforms import base_transform, check_cutout, train_transforms
from imagerec.utils import ImageRecError

log = logging.getLogger("imagerec")

_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# Every image's mode is read (a header read: ~0.1 ms a file, 10k CIFAR JPEGs in about a second) up to
# this many; a larger set is judged on this many spread over it, and a warning says so.
MODE_CHECK_LIMIT = 50_000
_HEADER_BYTES = 1 << 16  # a tar member's first 64 KB hold its header (JPEG SOF after EXIF included)


def _open_header(src: Source) -> Image.Image:
    """A lazily opened image (mode and size from its header; pixels not decoded)."""
    if isinstance(src, str):
        return Image.open(src)  # reads only what the header needs
    if isinstance(src, TarMember) and src.size > _HEADER_BYTES:
        with open(src.archive, "rb") as f:
            f.seek(src.offset)
            head = f.read(_HEADER_BYTES)
        try:
            im = Image.open(io.BytesIO(head))
            im.size  # noqa: B018 - the header was in the prefix
            return im
        except DECODE_ERRORS:
            pass  # a header beyond the prefix: read the whole member
    return Image.open(io.BytesIO(read_bytes(src)))


def infer_geometry(spec: DataSpec, limit: int = MODE_CHECK_LIMIT, size_probes: int = 1000) -> tuple[int, int]:
    """(channels, native size) from the data: 1 channel only when every image is grayscale (their
    modes from header reads; past `limit` images, `limit` of them spread evenly, with a warning
    when they decide 1 channel); the size is the median shorter side of `size_probes` images."""
    train = spec.splits.get("train") or next(iter(spec.splits.values()))
    first = train[0].source
    if isinstance(first, ArrayRef):  # IDX (grayscale by format) and CIFAR batches: the arrays say
        arr = spec.arrays[first.key]
        return (1 if arr.ndim == 3 else 3), int(min(arr.shape[1:3]))
    step = max(1, math.ceil(len(train) / limit))
    checked = train[::step]
    size_step = max(1, len(checked) // size_probes)
    colour, sides = False, []
    for k, it in enumerate(checked):
        probe = k % size_step == 0
        if colour and not probe:
            continue  # 3 channels is decided: only the size probes are left to read
        try:
            with _open_header(it.source) as im:
                mode, side = im.mode, min(im.size)
        except DECODE_ERRORS:
            continue  # a bad file is reported (and skipped) by the loader
        if probe or not sides:
            sides.append(side)
        colour = colour or mode not in _GRAY_MODES
    if not sides:
        raise ImageRecError(f"{spec.origin}: none of the training images could be opened; run 'imagerec check' on it")
    if not colour and len(checked) < len(train):
        log.warning("%s: the %d training images checked (every %d-th of %d) are all grayscale, so the run is 1-channel; "
                    "give --channels 3 if there are colour images among the others",
                    spec.origin, len(checked), step, len(train))
    return (3 if colour else 1), int(np.median(sides))


def uint8_sample(loader: ImageLoader, channels: int, n: int) -> torch.Tensor:
    """About n uint8 training images (B, C, H, W): every k-th image of the RAM cache, or the first
    four streamed batches (at most n)."""
    if loader.cache is not None:
        return loader.cache[torch.from_numpy(loader.valid[:: max(1, loader.num_items // n)])]
    batches = []
    for k, b in enumerate(loader.epoch(0)):
        batches.append(b.x)
        if k >= 3:
            break
    return torch.cat(batches)[:n] if batches else torch.zeros(1, channels, 1, 1, dtype=torch.uint8)


def measure_mean_std(loader: ImageLoader, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of the (uint8) training images, from up to 10k of them."""
    x = uint8_sample(loader, channels, 10000).float().div_(255).transpose(0, 1).reshape(channels, -1)  # (C, N*H*W)
    std = x.std(dim=1).clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in x.mean(dim=1)), tuple(round(float(v), 4) for v in std)


def any_readable(loader: ImageLoader) -> bool:
    """Whether any image of an evaluation loader decodes, on any process (each holds a shard)."""
    return bool(distributed.all_reduce_sum([float(loader.has_readable())])[0])


def counts_exact(*loaders: ImageLoader | None) -> bool:
    return all(loader is None or loader.counts_exact for loader in loaders)


def count_text(loader: ImageLoader | None, n: int) -> str:
    """n images, marked "listed" when the loader streams and has not yet met every image."""
    return f"{n}" if counts_exact(loader) else f"{n} listed"


def train_image_count(loader: ImageLoader, skipped: list[str]) -> int:
    """The training images that decode. A RAM cache knows; a streaming loader keeps every listed
    image in its epochs (so that they do not depend on what earlier epochs met), and the unreadable
    ones are those it skipped over the whole run (one message per file, resumed segments included)."""
    if loader.counts_exact:
        return loader.num_items
    unreadable = set().union(*distributed.all_gather_object(set(skipped) | set(loader.skipped.values())))
    return max(0, loader.num_items - len(unreadable))


def create_run_loader(spec: DataSpec, items: list, pre: PreprocessConfig, cfg: TrainConfig, train: bool,
                 class_sampling: torch.Tensor | None = None) -> ImageLoader:
    sample_weights = None
    if class_sampling is not None:  # per-class weights -> per-item sampling weights
        sample_weights = torch.tensor([float(class_sampling[it.target]) for it in items])
    if train:
        check_cutout(cfg.cutout, pre.input_size)  # before the images are read, not after
        size, transform, augment = train_transforms(pre, cfg.augment)
    else:
        size, transform, augment = pre.input_size, base_transform(pre), None
    procs = distributed.local_world_size()
    return ImageLoader(
        items,
        spec.arrays,
        pre.channels,
        size,
        transform,
        cfg.batch_size if train else max(cfg.batch_size, 256),
        targets_tensor(items, pre.num_classes, pre.multi_label),
        shuffle=train,
        seed=cfg.seed,
        augment=augment,
        workers=cfg.workers if cfg.workers >= 0 else default_workers(procs),
        cache=cfg.cache,
        max_pixels=cfg.max_pixels,
        fast_arrays=arrays_pass_through(pre, size),
        draft=pre.resize_size,
        sample_weights=sample_weights,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
        cache_share=procs,
    )
