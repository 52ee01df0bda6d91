"""`read_store`: a dataset in the store as a `DataSpec`, so `store:NAME` works wherever DATA does."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import sqlalchemy as sa

from imagerec.store.blobref import StoreBlob
from imagerec.store.db import Store, open_store
from imagerec.store.schema import datasets, images
from imagerec.utils import ImageRecError, did_you_mean

if TYPE_CHECKING:
    from imagerec.data import DataSpec

SPLIT_ORDER = ("train", "val", "test")


def dataset_row(store: Store, conn: sa.Connection, name: str) -> sa.Row:
    """The datasets row called `name`; an error listing the known names when there is none."""
    row = conn.execute(sa.select(datasets).where(datasets.c.name == name)).first()
    if row is None:
        known = list(conn.scalars(sa.select(datasets.c.name).order_by(datasets.c.name)))
        raise ImageRecError(
            f"no dataset '{name}' in the store {store.display_url}.{did_you_mean(name, known)} "
            f"Known: {', '.join(known) or 'none'}; add one with: imagerec ingest DATA --dataset {name}"
        )
    return row


def read_store(name: str, url: str | None = None, store: Store | None = None) -> DataSpec:
    """List dataset `name` from the store (at `url`, or the open `store`) without reading any image.

    Each item's source is a `StoreBlob(url, sha256)`: the decode path fetches its bytes from the
    database. Targets index `class_names` in the order the dataset recorded them.

    Example:
        >>> spec = read_store("mnist-mini")
        >>> spec.counts()
        {'train': 6000, 'test': 1000}
    """
    from imagerec.data import DataSpec, Item

    own = store is None
    store = store if store is not None else open_store(url)
    try:
        with store.read() as conn:
            ds = dataset_row(store, conn, name)
            rows = conn.execute(
                sa.select(images.c.sha256, images.c.labels, images.c.split, images.c.original_path)
                .where(images.c.dataset_id == ds.id)
                .order_by(images.c.id)
            ).all()
    finally:
        if own:
            store.close()
    class_names = _class_names(name, store, ds.class_names)
    index = {c: k for k, c in enumerate(class_names)}
    url_text = store.url_text
    splits: dict[str, list[Item]] = {}
    for sha, labels, split, original_path in rows:
        targets = _targets(name, store, original_path, labels, index, bool(ds.multi_label))
        target = tuple(targets) if ds.multi_label else targets[0]
        splits.setdefault(split, []).append(Item(StoreBlob(url_text, sha, original_path), target))
    if not splits:
        raise ImageRecError(f"dataset '{name}' in the store {store.display_url} has no images yet: ingest some first")
    ordered = {s: splits[s] for s in sorted(splits, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 9, s))}
    return DataSpec(f"store:{name}", class_names, ordered, multi_label=bool(ds.multi_label))


_DAMAGED = "the store is damaged: ingest the data again into a new dataset (imagerec ingest DATA --dataset NEW)"


def _class_names(name: str, store: Store, stored: object) -> list[str]:
    """The dataset's recorded class names, checked to be distinct strings: a damaged row gave
    targets that point at the wrong class, or per-class metrics that collide at the end of a run."""
    if not isinstance(stored, list) or not all(isinstance(c, str) for c in stored):
        raise ImageRecError(
            f"dataset '{name}' in the store {store.display_url}: its class names are not a list of names "
            f"({stored!r:.80}); {_DAMAGED}"
        )
    repeated = sorted(c for c, n in Counter(stored).items() if n > 1)
    if repeated:
        raise ImageRecError(
            f"dataset '{name}' in the store {store.display_url} names a class more than once "
            f"({', '.join(map(repr, repeated[:5]))}); {_DAMAGED}"
        )
    return stored


def _targets(name: str, store: Store, image: str, labels: object, index: dict[str, int], multi: bool) -> list[int]:
    """An image's class indices; one line naming the dataset, the image and the label when a stored
    label is not one of the dataset's classes (it raised a bare KeyError)."""
    where = f"dataset '{name}' in the store {store.display_url}, image {image}"
    if not isinstance(labels, list) or not all(isinstance(lab, str) for lab in labels):
        raise ImageRecError(f"{where}: its labels are not a list of class names ({labels!r:.80}); {_DAMAGED}")
    unknown = [lab for lab in labels if lab not in index]
    if unknown:
        raise ImageRecError(
            f"{where}: label {unknown[0]!r} is not one of the dataset's {len(index)} classes "
            f"({', '.join(list(index)[:10])}{', ...' if len(index) > 10 else ''}); {_DAMAGED}"
        )
    if not multi and len(labels) != 1:
        raise ImageRecError(
            f"{where}: {len(labels)} labels ({', '.join(map(repr, labels))}) in a single-label dataset; {_DAMAGED}"
        )
    return sorted(index[lab] for lab in labels)
