"""Data: readers that list items, one decode path, and loaders that feed the trainer."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from imagerec.data.archive import read_archive
from imagerec.data.decode import DecodeError, display_name, open_image, source_name
from imagerec.data.idx import is_cifar_dir, is_idx_dir
from imagerec.data.readers import DataSpec, Item, read_cifar, read_folder, read_idx_dir, read_manifest
from imagerec.utils import ImageRecError

__all__ = ["DataSpec", "DecodeError", "Item", "display_name", "open_image", "read_data", "source_name", "split_train_val"]

_SOURCES_HELP = (
    "DATA may be an image folder (<class>/<image> or <train|val|test>/<class>/<image>), an archive "
    "(.tar, .tar.gz, .zip) with that layout, a CSV/JSONL manifest, a folder of MNIST-style IDX files, "
    "a folder of CIFAR python batches, or a dataset name (mnist, fashion-mnist, cifar10, mnist-mini)"
)


def _read_path(p: Path) -> DataSpec:
    if p.is_dir():
        if is_idx_dir(p):
            return read_idx_dir(p)
        if is_cifar_dir(p):
            return read_cifar(p)
        return read_folder(p)
    name = p.name.lower()
    if name.endswith((".tar", ".tar.gz", ".tgz", ".zip")):
        return read_archive(p)
    if name.endswith((".csv", ".jsonl", ".ndjson")):
        return read_manifest(p)
    raise ImageRecError(f"cannot read {p}: unsupported file type. {_SOURCES_HELP}")


def read_data(data: str, data_dir: str | None = None, store_url: str | None = None) -> DataSpec:
    """List the items of DATA (a path or a dataset name) without decoding any image.

    `store:NAME` is read from the store at `store_url` (default `$IMAGEREC_DB`, then the SQLite file).

    Example:
        >>> spec = read_data("mnist-mini")
        >>> spec.class_names[:3], spec.counts()
        (['0', '1', '2'], {'train': 6000, 'test': 1000})
    """
    from imagerec.data.named import is_named_dataset, resolve_named_dataset

    if data.startswith("store:"):
        from imagerec.store import read_store

        return read_store(data.removeprefix("store:"), store_url)
    p = Path(data).expanduser()
    if not p.exists() and is_named_dataset(data):
        p = resolve_named_dataset(data, data_dir=data_dir)
    if not p.exists():
        raise ImageRecError(f"data not found: {data}. {_SOURCES_HELP}")
    try:
        return _read_path(p)
    except PermissionError as e:
        raise ImageRecError(f"cannot read {e.filename}: permission denied") from e


def split_train_val(spec: DataSpec, val_fraction: float, seed: int) -> DataSpec:
    """Without a `val` split, carve a deterministic stratified one out of `train`.

    Each class gives round(val_fraction * n) of its items (at least one when it has two or more),
    chosen by a seeded permutation of the items in listing order, so the split only depends on
    the data and the seed.
    """
    if "val" in spec.splits or val_fraction <= 0 or "train" not in spec.splits:
        return spec
    train = spec.splits["train"]
    by_class: dict[int, list[int]] = {}
    for i, it in enumerate(train):
        key = it.target if isinstance(it.target, int) else (it.target[0] if it.target else -1)
        by_class.setdefault(key, []).append(i)
    rng = np.random.default_rng(seed)
    val_idx: set[int] = set()
    for key in sorted(by_class):
        idx = by_class[key]
        n_val = int(round(val_fraction * len(idx)))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        else:
            n_val = 0
        val_idx.update(idx[j] for j in rng.permutation(len(idx))[:n_val])
    splits = dict(spec.splits)
    splits["train"] = [it for i, it in enumerate(train) if i not in val_idx]
    splits["val"] = [it for i, it in enumerate(train) if i in val_idx]
    return replace(spec, splits=splits)  # every other field (files, split_by, ...) as read
