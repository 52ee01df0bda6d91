"""Ingest: copy the images of any DATA source into the store, crash-safe, idempotent, resumable.

Every batch is one transaction that writes the blobs and the image rows together, so a process
killed at any instant leaves whole batches or nothing: no half-written rows, no orphan blobs.
Images are keyed by (dataset, sha256 of the bytes): which of a batch's images are already there
is asked in one query, and inserts use ON CONFLICT DO NOTHING, so re-running adds only what is
missing (a killed ingest resumes), and concurrent ingests (into different or the same dataset)
never store an image twice.
"""

from __future__ import annotations

import hashlib
import io
import re
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from PIL import Image

from imagerec.store.db import Store
from imagerec.store.schema import blobs, datasets, images
from imagerec.utils import ImageRecError

if TYPE_CHECKING:
    from imagerec.data import DataSpec, Item

DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
MAX_BATCH_BYTES = 256 << 20  # a batch of large photos is cut short here to bound memory
SPLIT_ORDER = ("train", "val", "test")


@dataclass
class IngestReport:
    """What one ingest did. `skipped` lists (file, reason) for unreadable or non-image files."""

    dataset: str
    source: str
    seen: int = 0
    added: int = 0
    already_present: int = 0
    duplicates: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    added_per_split: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.seen / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"{self.dataset}: {self.added} added, {self.already_present} already stored, "
            f"{self.duplicates} duplicate(s) in the source, {len(self.skipped)} unreadable "
            f"({self.seen} seen in {self.seconds:.1f} s, {self.images_per_s:.0f} images/s)"
        )


def insert_ignoring_conflicts(store: Store, table: sa.Table, *conflict_columns: str) -> Any:
    """INSERT ... ON CONFLICT (cols) DO NOTHING for the store's dialect."""
    if store.dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table).on_conflict_do_nothing(index_elements=list(conflict_columns) or None)


def check_dataset_name(name: str) -> str:
    if not DATASET_NAME.match(name):
        raise ImageRecError(
            f"invalid dataset name '{name}': use letters, digits, '.', '_' and '-' (up to 200), starting with a letter or digit"
        )
    return name


def ensure_dataset(store: Store, name: str, class_names: list[str], multi_label: bool) -> int:
    """Create dataset `name`, or extend its class names (existing order kept, new ones appended)."""
    check_dataset_name(name)
    with store.write() as conn:
        conn.execute(
            insert_ignoring_conflicts(store, datasets, "name"),
            {"name": name, "created_at": datetime.now(timezone.utc), "class_names": class_names, "multi_label": multi_label},
        )
        row = conn.execute(
            sa.select(datasets.c.id, datasets.c.class_names, datasets.c.multi_label)
            .where(datasets.c.name == name)
            .with_for_update()
        ).one()
        merged = list(row.class_names) + [c for c in class_names if c not in row.class_names]
        if merged != list(row.class_names) or (multi_label and not row.multi_label):
            conn.execute(
                sa.update(datasets)
                .where(datasets.c.id == row.id)
                .values(class_names=merged, multi_label=bool(row.multi_label or multi_label))
            )
        return int(row.id)


def _select_items(spec: DataSpec, split: str | None) -> list[tuple[str, Item]]:
    """(split, item) pairs to ingest. With `split`, only that split of the source; a source without
    a split layout (one split only) is stored under `split`."""
    names = sorted(spec.splits, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 9, s))
    if split is None:
        return [(s, it) for s in names for it in spec.splits[s]]
    if split not in SPLIT_ORDER:
        raise ImageRecError(f"unknown split '{split}': use train, val or test")
    if split in spec.splits:
        return [(split, it) for it in spec.splits[split]]
    if len(names) == 1:
        return [(split, it) for it in spec.splits[names[0]]]
    raise ImageRecError(f"{spec.origin} has no '{split}' split (it has {', '.join(names)}); leave out --split to ingest all")


def array_png(arr: Any) -> bytes:
    """One uint8 image array (H, W) or (H, W, 3) -> PNG bytes (deterministic for a given Pillow/zlib)."""
    buf = io.BytesIO()
    Image.fromarray(arr, "L" if arr.ndim == 2 else "RGB").save(buf, "PNG")
    return buf.getvalue()


def probe_image(data: bytes, name: str) -> tuple[int, int, str, str]:
    """(width, height, mode, format) of encoded image bytes, after checking that they fully decode."""
    from imagerec.data.decode import DEFAULT_MAX_PIXELS, DecodeError, check_pixels, decode_errors

    if not data:
        raise DecodeError(f"{name}: empty file (0 bytes)")
    with decode_errors(name), Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        check_pixels(name, (w, h), DEFAULT_MAX_PIXELS)
        info = (w, h, img.mode, img.format or "unknown")
        if img.format == "JPEG":  # decode at 1/8 scale: still reads (and checks) the whole stream
            img.draft(None, (max(1, w // 8), max(1, h // 8)))
        img.load()
    return info


def item_name(spec: DataSpec, item: Item) -> str:
    """The item's original path; array images are `<origin>#<split>[<index>]`."""
    from imagerec.data.decode import ArrayRef, source_name

    name = source_name(item.source)
    return f"{spec.origin}#{name}" if isinstance(item.source, ArrayRef) else name


def _prepare(spec: DataSpec, split: str, item: Item, name: str) -> dict[str, Any]:
    """Read, hash and check one item; raises DecodeError for anything unreadable."""
    from imagerec.data.decode import ArrayRef, DecodeError, decode_errors, read_bytes

    if isinstance(item.source, ArrayRef):
        try:
            data = array_png(spec.arrays[item.source.key][item.source.index])
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise DecodeError(f"{name}: cannot read the array image ({type(e).__name__}: {e})") from e
    else:
        with decode_errors(name, "read"):
            data = read_bytes(item.source)
    width, height, mode, fmt = probe_image(data, name)
    target = item.target
    label_idx = list(target) if isinstance(target, tuple) else [target]
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "data": data,
        "original_path": name,
        "width": width,
        "height": height,
        "mode": mode,
        "format": fmt,
        "labels": [spec.class_names[k] for k in label_idx],
        "split": split,
    }


def _batches(
    spec: DataSpec, pairs: list[tuple[str, Item]], batch_size: int, report: IngestReport
) -> Iterator[list[dict[str, Any]]]:
    from imagerec.data.decode import DecodeError

    batch: list[dict[str, Any]] = []
    size = 0
    for split, item in pairs:
        report.seen += 1
        name = item_name(spec, item)
        try:
            row = _prepare(spec, split, item, name)
        except DecodeError as e:
            report.skipped.append((name, str(e)))
            continue
        batch.append(row)
        size += len(row["data"])
        if len(batch) >= batch_size or size >= MAX_BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def write_batch(store: Store, dataset_id: int, batch: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """One transaction: store the batch's images not yet in the dataset, with their blobs.

    Returns (rows inserted, duplicates within the batch).
    """
    unique: dict[str, dict[str, Any]] = {}
    for row in batch:
        unique.setdefault(row["sha256"], row)
    duplicates = len(batch) - len(unique)
    with store.write() as conn:
        present = set(
            conn.scalars(
                sa.select(images.c.sha256).where(images.c.dataset_id == dataset_id, images.c.sha256.in_(list(unique)))
            )
        )
        new = [row for sha, row in unique.items() if sha not in present]
        if not new:
            return [], duplicates
        have_blob = set(conn.scalars(sa.select(blobs.c.sha256).where(blobs.c.sha256.in_([r["sha256"] for r in new]))))
        blob_rows = [
            {"sha256": r["sha256"], "size": len(r["data"]), "data": r["data"]} for r in new if r["sha256"] not in have_blob
        ]
        if blob_rows:
            conn.execute(insert_ignoring_conflicts(store, blobs, "sha256"), blob_rows)
        image_rows = [{k: v for k, v in r.items() if k != "data"} | {"dataset_id": dataset_id} for r in new]
        inserted = set(
            conn.execute(
                insert_ignoring_conflicts(store, images, "dataset_id", "sha256").returning(images.c.sha256), image_rows
            ).scalars()
        )
    return [r for r in new if r["sha256"] in inserted], duplicates


def ingest(
    store: Store,
    source: str,
    dataset: str,
    split: str | None = None,
    batch_size: int = 500,
    progress: bool = True,
) -> IngestReport:
    """Copy the images of `source` (any DATA that `read_data` accepts) into `dataset` in the store.

    Images are stored once per dataset by the sha256 of their bytes (array sources such as IDX
    or CIFAR batches as PNG). Unreadable files are skipped and listed in the report. With
    `split`, only that split of the source is ingested (a source with no split layout is stored
    under it). Safe to interrupt at any point and to run again, or concurrently.

    Example:
        >>> with open_store("/tmp/store.db") as store:
        ...     report = ingest(store, "mnist-mini", "mnist-mini", progress=False)
        >>> report.added
        7000
    """
    from imagerec.data import read_data

    if batch_size < 1:
        raise ImageRecError(f"batch_size must be at least 1, got {batch_size}")
    check_dataset_name(dataset)
    start = time.perf_counter()
    spec = read_data(source)
    pairs = _select_items(spec, split)
    report = IngestReport(dataset=dataset, source=source)
    dataset_id = ensure_dataset(store, dataset, spec.class_names, spec.multi_label)
    added: Counter[str] = Counter()
    bar = _progress_bar() if progress else None
    with bar or nullcontext():
        task = bar.add_task(f"ingest {dataset}", total=len(pairs)) if bar is not None else None
        for batch in _batches(spec, pairs, batch_size, report):
            inserted, duplicates = write_batch(store, dataset_id, batch)
            report.duplicates += duplicates
            report.added += len(inserted)
            report.already_present += len(batch) - duplicates - len(inserted)
            added.update(r["split"] for r in inserted)
            if bar is not None:
                bar.update(task, completed=report.seen)
        if bar is not None:
            bar.update(task, completed=len(pairs))
    report.added_per_split = dict(added)
    report.seconds = time.perf_counter() - start
    return report


def _progress_bar() -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=Console(stderr=True),
    )
