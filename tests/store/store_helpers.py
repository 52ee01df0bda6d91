"""Helpers shared by the store tests: facts about a source, and store integrity checks."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import sqlalchemy as sa

from imagerec.data import DataSpec
from imagerec.store import open_store

CORRUPT_FILES = ("train/cat/truncated.jpg", "test/dog/not-an-image.jpg")


@dataclass
class SourceFacts:
    """What a source holds, computed independently of the store."""

    spec: DataSpec
    # split -> [(sha256 of the stored bytes, label name)] in listing order
    items: dict[str, list[tuple[str, str]]]

    def counts(self) -> dict[str, Counter]:
        return {s: Counter(label for _, label in rows) for s, rows in self.items.items()}


def stored_counts(url: str, dataset: str) -> dict[str, Counter]:
    """{split: Counter(label)} straight from the images table."""
    from imagerec.store.schema import datasets, images

    with open_store(url) as store, store.read() as conn:
        rows = conn.execute(
            sa.select(images.c.split, images.c.labels)
            .join(datasets, datasets.c.id == images.c.dataset_id)
            .where(datasets.c.name == dataset)
        ).all()
    counts: dict[str, Counter] = {}
    for split, labels in rows:
        counts.setdefault(split, Counter()).update(labels)
    return counts


def integrity(url: str) -> dict[str, int]:
    """Counts that must all be zero in a healthy store (plus the totals, for context)."""
    with open_store(url) as store, store.read() as conn:
        q = conn.exec_driver_sql
        return {
            "orphan_blobs": q("SELECT count(*) FROM blobs b WHERE NOT EXISTS (SELECT 1 FROM images i WHERE i.sha256 = b.sha256)").scalar(),
            "images_without_blob": q("SELECT count(*) FROM images i LEFT JOIN blobs b ON b.sha256 = i.sha256 WHERE b.sha256 IS NULL").scalar(),
            "duplicate_images": q("SELECT count(*) FROM (SELECT 1 FROM images GROUP BY dataset_id, sha256 HAVING count(*) > 1) d").scalar(),
            "images": q("SELECT count(*) FROM images").scalar(),
            "blobs": q("SELECT count(*) FROM blobs").scalar(),
        }


def assert_healthy(url: str) -> dict[str, int]:
    facts = integrity(url)
    assert (facts["orphan_blobs"], facts["images_without_blob"], facts["duplicate_images"]) == (0, 0, 0), facts
    return facts
