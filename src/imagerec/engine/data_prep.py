"""What a run trains on, and how its inputs are prepared: the `--limit-train` subset, a warning for
classes left without training images, and the preprocessing that `--pretrained RUN_DIR` weights expect."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from imagerec.data.decode import source_name
from imagerec.engine.checkpoint import read_checkpoint_meta
from imagerec.utils import ImageRecError

log = logging.getLogger("imagerec")


def limit_items(items: list, n: int, seed: int) -> list:
    """A stratified subset of `n` items (`--limit-train`), in listing order: each class keeps its share
    of `n` (at least one image while `n` has room for one per class), picked by a seeded permutation
    as `split_train_val` picks val, so the subset depends only on the data and the seed."""
    if not n or n >= len(items):
        return items
    by_class: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        by_class.setdefault(it.target if isinstance(it.target, int) else (it.target[0] if it.target else -1), []).append(i)
    keys = sorted(by_class)
    sizes = np.array([len(by_class[k]) for k in keys])
    exact = n * sizes / len(items)
    quota = np.floor(exact).astype(np.int64)
    if n >= len(keys):
        quota = np.maximum(quota, 1)  # a class with no image is a class the model never trains on
    while quota.sum() < n:  # largest remainders first
        quota[np.argmax(np.where(quota < sizes, exact - quota, -np.inf))] += 1
    while quota.sum() > n:  # only after the one-per-class minimum: take from the most over-served class
        quota[np.argmax(np.where(quota > 1, quota - exact, -np.inf))] -= 1
    rng = np.random.default_rng(seed)
    keep = [by_class[k][j] for k, q in zip(keys, quota, strict=True) for j in rng.permutation(len(by_class[k]))[:q]]
    return [items[i] for i in sorted(keep)]


def subset_fingerprint(items: list) -> str:
    """sha256 over the (source, label) of the items a run trains on: which images `--limit-train` picked."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{source_name(it.source)}\t{it.target}\n".encode())
    return h.hexdigest()


def record_train_subset(now: dict[str, Any], saved: dict[str, Any] | None, items: list, limit: int) -> None:
    """Record which images `--limit-train` picked in the run's data record `now`; on resume (`saved`:
    the checkpoint's data record), warn when they are not the ones the run started with."""
    if not limit:
        return
    now["train_subset"] = subset_fingerprint(items)
    if saved is None or saved.get("fingerprint") != now["fingerprint"]:
        return  # a new run, or the data itself changed (warned about already)
    if "train_subset" not in saved:
        log.warning("--limit-train %d: this run was saved before imagerec recorded which images the limit picked, so "
                    "it cannot check that the resumed run trains on the same ones (runs started before 2026-12-07 "
                    "picked them differently and resume on another subset); train again for an exact continuation",
                    limit)
    elif saved["train_subset"] != now["train_subset"]:
        log.warning("--limit-train %d: the images picked now differ from those this run started with (the selection "
                    "rule changed); resuming on the new subset", limit)


def warn_untrained_classes(counts: np.ndarray, class_names: list[str], limit: int) -> None:
    missing = [name for name, c in zip(class_names, counts.tolist(), strict=True) if c == 0]
    if not missing:
        return
    fix = (f"raise --limit-train {limit} to at least {len(class_names)} (one image per class) or more"
           if limit else "add training images for them")
    log.warning("no training images for %d class(es): %s%s; the model cannot learn them: %s", len(missing),
                ", ".join(missing[:10]), ", ..." if len(missing) > 10 else "", fix)


def source_preprocess(source: str) -> dict[str, Any] | None:
    """The preprocessing an imagerec run (or one of its checkpoints) saved with the weights that
    `--pretrained source` loads; None for other sources (a plain .safetensors file, the Hub)."""
    path = Path(source).expanduser()
    stems = [path / "best", path / "last"] if path.is_dir() else [path.with_suffix("")] if path.suffix == ".safetensors" else []
    for stem in stems:
        if stem.with_suffix(".json").is_file():
            try:
                return read_checkpoint_meta(stem)["preprocess"]
            except (ImageRecError, KeyError):
                return None
    return None


def norm_for_channels(pre: dict[str, Any], channels: int, source: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The source run's mean/std, adapted (with a warning) when it had another number of channels."""
    mean, std = tuple(float(v) for v in pre["mean"]), tuple(float(v) for v in pre["std"])
    if len(mean) == channels:
        return mean, std
    log.warning("--pretrained %s was trained on %d-channel images, this run has %d: its mean/std are %s",
                source, len(mean), channels, "averaged" if channels == 1 else "repeated per channel")
    if channels == 1:
        return (round(sum(mean) / len(mean), 4),), (round(sum(std) / len(std), 4),)
    return mean * channels, std * channels
