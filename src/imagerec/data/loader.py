"""Batches for the trainer and evaluator.

Datasets that fit in RAM are decoded once into a uint8 tensor (N, C, H, W) and batches are
sliced from it; larger ones stream through DataLoader workers. Either way a batch is uint8 on the
host; normalisation and batch augmentation happen on the device.

Every random draw is seeded from (seed, epoch, position), so an epoch's batches do not depend on
worker count or on where a resumed run starts: `epoch(e, start_step=k)` yields exactly the
batches an uninterrupted run would from step k on.

Under torchrun (`world_size` > 1) a training loader yields this rank's part of each global batch
of `batch_size * world_size` items: positions rank, rank + world_size, ... of the batch a single
process with that batch size would take. So N processes see the same global batches as one, and
every rank takes the same number of steps (DDP needs that, or the ranks wait on each other
forever). An evaluation loader holds only this rank's share of the items.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from imagerec.data.decode import DEFAULT_MAX_PIXELS, ArrayRef, DecodeError, open_image
from imagerec.data.readers import Item
from imagerec.utils import ImageRecError, available_cpus, mix_seed

if TYPE_CHECKING:
    from imagerec.config import PreprocessConfig

log = logging.getLogger("imagerec")


class DataSourceError(ImageRecError):
    """The data's source failed (the image store unreachable or damaged), not one image: the run
    cannot go on, unlike with a bad file, which is skipped."""


class _SourceFailure(str):
    """A source failure inside a loader worker, carried back to the main process in the batch's
    error list (raised from the worker, DataLoader would wrap it in the worker's traceback text)."""


def _raise_source_failures(errors: list[str]) -> None:
    failed = [e for e in errors if isinstance(e, _SourceFailure)]
    if failed:
        raise DataSourceError(str(failed[0]))


@dataclass
class Batch:
    x: torch.Tensor  # (B, C, H, W) uint8
    y: torch.Tensor  # (B,) int64, or (B, K) float multi-hot
    index: torch.Tensor  # (B,) positions in the split's item list
    skipped: list[str]  # decode errors met while building this batch


class DecodeDataset(Dataset):
    """Item -> uint8 tensor through `transform` (and `augment`, seeded per item). Failures are
    returned, not raised, so one bad file never stops a run."""

    def __init__(
        self,
        items: list[Item],
        arrays: dict[str, np.ndarray],
        channels: int,
        transform: Callable,
        augment: Callable | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        draft: int | None = None,
    ) -> None:
        self.items, self.arrays, self.channels = items, arrays, channels
        self.transform, self.augment, self.max_pixels = transform, augment, max_pixels
        self.draft = (draft, draft) if draft else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, torch.Tensor | None, str | None]:
        i, seed = key
        try:
            img = open_image(self.items[i].source, self.channels, self.arrays, self.max_pixels, self.draft)
            t = self.transform(img)
        except DecodeError as e:
            return i, None, str(e)
        except ImageRecError as e:  # the store failed: every image after this one would too
            return i, None, _SourceFailure(e)
        if self.augment is not None:
            torch.manual_seed(seed)
            t = self.augment(t)
        return i, t, None


class CachedDataset(Dataset):
    """Per-item augmentation over an already decoded uint8 cache (shared with workers via fork)."""

    def __init__(self, cache: torch.Tensor, augment: Callable) -> None:
        self.cache, self.augment = cache, augment

    def __len__(self) -> int:
        return self.cache.shape[0]

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, torch.Tensor, None]:
        i, seed = key
        torch.manual_seed(seed)
        return i, self.augment(self.cache[i]), None


Collated = tuple[torch.Tensor, torch.Tensor | None, list[str], list[int]]


def _collate(samples: list[tuple[int, torch.Tensor | None, str | None]]) -> Collated:
    """(indices, images, errors, indices of the images that failed)."""
    good = [(i, t) for i, t, _ in samples if t is not None]
    errors = [e for _, t, e in samples if t is None and e]
    failed = [i for i, t, _ in samples if t is None]
    if not good:
        return torch.empty(0, dtype=torch.long), None, errors, failed
    return torch.tensor([i for i, _ in good]), torch.stack([t for _, t in good]), errors, failed


def targets_tensor(items: list[Item], num_classes: int, multi_label: bool) -> torch.Tensor:
    if not multi_label:
        return torch.tensor([it.target for it in items], dtype=torch.long)
    y = torch.zeros(len(items), num_classes)
    for i, it in enumerate(items):
        labels = it.target if isinstance(it.target, tuple) else (it.target,)
        y[i, list(labels)] = 1.0
    return y


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def default_workers(processes: int = 1) -> int:
    """Decode workers for one of `processes` training processes sharing this machine's cores."""
    return max(1, min(8, available_cpus() // max(1, processes) - 1))


def arrays_pass_through(pre: PreprocessConfig, size: int) -> bool:
    """Whether `base_transform(pre, size=size)` returns an image that is already `size` x `size` in
    `pre.channels` unchanged (no ops, no resize), so IDX/CIFAR arrays at that size may be copied
    into the cache as they are (`ImageLoader(fast_arrays=...)`)."""
    resize = pre.resize_size if size == pre.input_size else size  # base_transform's default resize
    return not pre.ops and resize == size


def _ignore_sigint(worker_id: int) -> None:
    # Ctrl-C reaches every process of the terminal's group. A worker leaves stopping to its main
    # process, which under torchrun first finishes its step so that all ranks stop together.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ImageLoader:
    """Batches of one split, cached in RAM or streamed.

    Example:
        >>> loader = ImageLoader(items, arrays, channels=1, size=28, transform=t, batch_size=128)
        >>> for batch in loader.epoch(0): ...
    """

    def __init__(
        self,
        items: list[Item],
        arrays: dict[str, np.ndarray],
        channels: int,
        size: int,
        transform: Callable,
        batch_size: int,
        targets: torch.Tensor,
        shuffle: bool = False,
        seed: int = 0,
        augment: Callable | None = None,
        workers: int = -1,
        cache: str = "auto",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        fast_arrays: bool = False,
        draft: int | None = None,
        sample_weights: torch.Tensor | None = None,
        rank: int = 0,
        world_size: int = 1,
        cache_share: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size = rank, world_size
        self.positions: np.ndarray | None = None  # evaluation shard: positions in the full item list
        if world_size > 1 and not shuffle:
            # This rank decodes and scores only items rank, rank + world_size, ...; the trainer
            # gathers the logits. Batch.index keeps positions in the full list.
            self.positions = np.arange(rank, len(items), world_size)
            items = [items[i] for i in self.positions]
            targets = targets[torch.from_numpy(self.positions)]
            if sample_weights is not None:
                sample_weights = sample_weights[torch.from_numpy(self.positions)]
        self.items, self.targets = items, targets
        self.sample_weights = sample_weights
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.augment = augment
        self.workers = default_workers() if workers < 0 else workers
        self.skipped: dict[int, str] = {}
        self.decode = DecodeDataset(items, arrays, channels, transform, None, max_pixels, draft=draft)
        nbytes = len(items) * channels * size * size
        # `cache_share` processes on this machine each hold such a cache (torchrun's local world size).
        budget = min(available_memory() // 4, 8 << 30)
        self.cached = cache == "ram" or (cache == "auto" and nbytes * cache_share < budget)
        self.cache: torch.Tensor | None = None
        self.valid = np.arange(len(items))
        self._checked = False  # a streaming evaluation loader: `valid` holds only readable items (a full pass)
        if self.cached:
            self._build_cache(arrays, channels, size, fast_arrays)

    def _build_cache(self, arrays: dict[str, np.ndarray], channels: int, size: int, fast_arrays: bool) -> None:
        """Decode every item once. IDX/CIFAR arrays already at the right size are copied directly when
        `fast_arrays` says the transform leaves them unchanged (`arrays_pass_through`), checked on a few.

        Under torchrun every rank decodes the whole training set into its own cache: each epoch's
        shuffle sends every item to some rank, so each needs them all (an evaluation loader holds
        only its shard)."""
        refs = [it.source for it in self.items]
        if fast_arrays and refs and all(isinstance(r, ArrayRef) and r.key == refs[0].key for r in refs):
            arr = arrays[refs[0].key]
            if arr.shape[1:3] == (size, size) and (arr.ndim == 3) == (channels == 1) and (arr.ndim == 3 or arr.shape[3] == channels):
                idx = np.array([r.index for r in refs])
                t = torch.from_numpy(np.ascontiguousarray(arr[idx]))
                t = (t[:, None] if t.ndim == 3 else t.permute(0, 3, 1, 2)).contiguous()  # (N, C, H, W)
                if self._transform_keeps(t):
                    self.cache = t
                    return
                log.debug("the transform changes the arrays' images: decoding them through it")
        cache = torch.empty((len(self.items), channels, size, size), dtype=torch.uint8)
        ok = np.zeros(len(self.items), dtype=bool)
        keys = [(i, 0) for i in range(len(self.items))]
        batches = [keys[k : k + 256] for k in range(0, len(keys), 256)]
        workers = self.workers if len(self.items) > 2000 else 0
        dl = DataLoader(self.decode, batch_sampler=batches, num_workers=workers, collate_fn=_collate)
        for idx, x, errors, _ in dl:
            _raise_source_failures(errors)
            if x is not None:
                cache[idx] = x
                ok[idx.numpy()] = True
            self._note_errors(errors)
        self.valid = np.flatnonzero(ok)
        self.cache = cache

    def _transform_keeps(self, raw: torch.Tensor, probes: int = 3) -> bool:
        """Whether the transform returns a few of the raw array images (N, C, H, W) unchanged: a check
        that the caller's `fast_arrays` holds, so the cache never differs from what eval/predict compute."""
        for i in np.unique(np.linspace(0, len(self.items) - 1, probes).astype(int)):
            _, t, _ = self.decode[(int(i), 0)]
            if t is not None and not isinstance(t, torch.Tensor):  # a transform that returns the PIL image
                t = torch.from_numpy(np.array(t))
                t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)  # (C, H, W)
            if t is None or not torch.equal(t, raw[i]):
                return False
        return True

    def _note_errors(self, errors: list[str]) -> list[str]:
        new = []
        for e in errors:
            key = hash(e)
            if key not in self.skipped:
                self.skipped[key] = e
                new.append(e)
                log.warning("skipped: %s", e)
        return new

    @property
    def num_items(self) -> int:
        """The images batches are drawn from: those that decode when cached; when streaming, those
        listed (less, for an evaluation loader, the ones a full pass found unreadable): a streaming
        loader learns which are unreadable only as it meets them (`counts_exact`)."""
        return len(self.valid)

    @property
    def counts_exact(self) -> bool:
        """Whether `num_items` counts only images that decode (every item was decoded once)."""
        return self.cache is not None or self._checked

    def has_readable(self) -> bool:
        """Whether any image decodes. A streaming loader decodes items in turn until one does: one
        decode for a split with readable images. When none does, `num_items` becomes 0."""
        if self.cache is not None or self._checked or not len(self.valid):
            return bool(len(self.valid))
        for i in self.valid:
            _, t, e = self.decode[(int(i), 0)]
            if t is not None:
                return True
            _raise_source_failures([e] if e else [])
            self._note_errors([e] if e else [])
        self.valid, self._checked = self.valid[:0], True
        return False

    @property
    def global_batch_size(self) -> int:
        """Items per training step over all ranks."""
        return self.batch_size * self.world_size if self.shuffle else self.batch_size

    def __len__(self) -> int:
        n, g = self.num_items, self.global_batch_size
        if self.shuffle and n > g:
            # Drop the ragged last batch: a batch of 1 breaks BatchNorm, and under torchrun every
            # rank then gets exactly batch_size items per step.
            return n // g
        return (n + g - 1) // g

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.valid
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        if self.sample_weights is not None:
            # Class-balanced sampling with replacement: an epoch still has len(valid) draws.
            w = self.sample_weights[torch.from_numpy(self.valid)]
            return self.valid[torch.multinomial(w, len(self.valid), replacement=True, generator=g).numpy()]
        return self.valid[torch.randperm(len(self.valid), generator=g).numpy()]

    def epoch(self, epoch: int = 0, start_step: int = 0) -> Iterator[Batch]:
        """The batches of `epoch`, starting at batch `start_step`."""
        order = self.order(epoch)
        g = self.global_batch_size
        r, w = (self.rank, self.world_size) if self.shuffle else (0, 1)  # an eval loader is already a shard
        chunks = [order[k * g : (k + 1) * g][r::w] for k in range(start_step, len(self))]  # this rank's part
        if self.cache is not None and self.augment is None:
            for idx in chunks:
                t = torch.from_numpy(idx)
                yield Batch(self.cache[t], self.targets[t], self._full_positions(t), [])
            return
        dataset: Dataset
        if self.cache is not None:
            dataset = CachedDataset(self.cache, self.augment)  # type: ignore[arg-type]
        else:
            self.decode.augment = self.augment
            dataset = self.decode
        keyed = [[(int(i), mix_seed(self.seed, epoch, int(i))) for i in idx] for idx in chunks]
        workers = self.workers if len(keyed) > 1 else 0
        dl = DataLoader(
            dataset,
            batch_sampler=keyed,
            num_workers=workers,
            collate_fn=_collate,
            prefetch_factor=4 if workers else None,
            persistent_workers=False,
            multiprocessing_context="fork" if workers and os.name == "posix" else None,
            worker_init_fn=_ignore_sigint if workers else None,
        )
        failed: list[int] = []
        for idx, x, errors, bad in dl:
            _raise_source_failures(errors)
            skipped = self._note_errors(errors)
            failed += bad
            if x is None:
                if self.shuffle and self.world_size > 1:
                    # Skipping the step here would leave the other ranks waiting for this one.
                    raise ImageRecError(
                        f"every image of a batch of rank {self.rank} was unreadable ({'; '.join(errors[:2])}); "
                        "find and move the bad files with: imagerec check DATA --fix quarantine DIR"
                    )
                continue
            yield Batch(x, self.targets[idx], self._full_positions(idx), skipped)
        if not self.shuffle and start_step == 0:
            # An evaluation pass met every item: count only the readable ones from now on. (A training
            # loader keeps its list: an epoch's batches must not depend on what earlier epochs met.)
            self.valid, self._checked = np.setdiff1d(self.valid, failed), True

    def _full_positions(self, idx: torch.Tensor) -> torch.Tensor:
        return idx if self.positions is None else torch.from_numpy(self.positions)[idx]
