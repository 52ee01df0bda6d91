"""`read_store`: a dataset in the store as a `DataSpec`, so `store:NAME` works wherever DATA does."""

from __future__ import annotations

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
    class_names = list(ds.class_names)
    index = {c: k for k, c in enumerate(class_names)}
    url_text = store.url_text
    splits: dict[str, list[Item]] = {}
    for sha, labels, split, original_path in rows:
        targets = sorted(index[label] for label in labels)
        target = tuple(targets) if ds.multi_label else targets[0]
        splits.setdefault(split, []).append(Item(StoreBlob(url_text, sha, original_path), target))
    if not splits:
        raise ImageRecError(f"dataset '{name}' in the store {store.display_url} has no images yet: ingest some first")
    ordered = {s: splits[s] for s in sorted(splits, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 9, s))}
    return DataSpec(f"store:{name}", class_names, ordered, multi_label=bool(ds.multi_label))
