"""Ingest: copy the images of any DATA source into the store, crash-safe, idempotent, resumable.

Every batch is one transaction that writes the blobs and the image rows together, so a process
killed at any instant leaves whole batches or nothing: no half-written rows, no orphan blobs.
Images are keyed by (dataset, sha256 of the bytes): which of a batch's images are already there
is asked in one query, and inserts use ON CONFLICT DO NOTHING, so re-running adds only what is
missing (a killed ingest resumes), and concurrent ingests (into different or the same dataset)
never store an image twice. The dataset row itself is created (or its class names extended) in
the transaction of the first batch, so an ingest that stores nothing leaves no empty dataset.

One row per image means one set of labels and one split per image, and conflicts are reported,
never dropped silently:
- an image already stored with other labels or another split than the source says (it was moved
  to another class folder, say) is kept as stored and listed in `stored_conflicts`; with
  `update=True` its labels, split and original path are rewritten to the source's instead, in
  the same batch transaction (`relabelled`);
- the same bytes more than once in the source count as `duplicates` (tracked by sha256 over the
  whole run, not only within a batch); the first copy is stored, and copies that disagree with it
  on labels or split are listed in `source_conflicts`.
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
from imagerec.utils import ImageRecError, check_count

if TYPE_CHECKING:
    from imagerec.data import DataSpec, Item

DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
MAX_BATCH_BYTES = 256 << 20  # a batch of large photos is cut short here to bound memory
SPLIT_ORDER = ("train", "val", "test")


@dataclass(frozen=True)
class LabelConflict:
    """One image whose labels or split in the source (`path`) disagree with another copy of the same
    bytes (`other_path`): the stored row, or the image's first copy in the source."""

    path: str
    labels: tuple[str, ...]
    split: str
    other_path: str
    other_labels: tuple[str, ...]
    other_split: str


def _where(split: str, labels: tuple[str, ...]) -> str:
    return f"{split}: {', '.join(repr(x) for x in labels) or 'no label'}"


@dataclass
class IngestReport:
    """What one ingest did. `skipped` lists (file, reason) for unreadable or non-image files.

    Every readable image is counted once: `added`, `already_present` (stored with the same labels
    and split), `relabelled` (stored otherwise, rewritten: `update=True`), `stored_conflicts`
    (stored otherwise, kept) or `duplicates` (a copy of an earlier image of the source; those whose
    labels or split disagree with the first copy are also in `source_conflicts`).
    """

    dataset: str
    source: str
    seen: int = 0
    added: int = 0
    already_present: int = 0
    duplicates: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    relabelled: list[LabelConflict] = field(default_factory=list)
    stored_conflicts: list[LabelConflict] = field(default_factory=list)
    source_conflicts: list[LabelConflict] = field(default_factory=list)
    added_per_split: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    update: bool = False
    notes: list[str] = field(default_factory=list)  # what the reader left out, which `seen` does not count

    @property
    def images_per_s(self) -> float:
        return self.seen / self.seconds if self.seconds > 0 else 0.0

    @property
    def readable(self) -> int:
        return self.added + self.already_present + len(self.relabelled) + len(self.stored_conflicts) + self.duplicates

    def summary(self) -> str:
        parts = [f"{self.added} added", f"{self.already_present} already stored"]
        if self.update or self.relabelled:
            parts.append(f"{len(self.relabelled)} relabelled")
        if self.stored_conflicts:
            parts.append(f"{len(self.stored_conflicts)} stored with other labels/split (kept)")
        duplicates = f"{self.duplicates} duplicate(s) in the source"
        if self.source_conflicts:
            duplicates += f" ({len(self.source_conflicts)} with other labels/split)"
        parts += [duplicates, f"{len(self.skipped)} unreadable"]
        left_out = f"; the source's reader left files out: {len(self.notes)} note(s) below" if self.notes else ""
        return (
            f"{self.dataset}: {', '.join(parts)} "
            f"({self.seen} seen in {self.seconds:.1f} s, {self.images_per_s:.0f} images/s{left_out})"
        )

    def conflict_lines(self, limit: int = 10) -> list[str]:
        """What to read after `summary()`: the first `limit` conflicts of each kind, and what to do."""
        sections = (
            (self.stored_conflicts, "is stored as",
             f"{len(self.stored_conflicts)} image(s) are stored with other labels/split than the source gives them; "
             "the store kept its own. Ingest again with --update (update=True) to take the source's:"),
            (self.source_conflicts, "is a copy of",
             f"{len(self.source_conflicts)} image(s) in the source are byte-identical copies of an earlier image "
             "with other labels/split; only the first copy is stored. Delete or fix the wrong copy and ingest "
             "again (with --update if it was the first copy):"),
            (self.relabelled, "was", f"{len(self.relabelled)} image(s) relabelled to what the source says:"),
        )
        lines: list[str] = []
        for items, verb, header in sections:
            if items:
                lines.append(header)
                lines += [f"  {c.path} ({_where(c.split, c.labels)}) {verb} {c.other_path} "
                          f"({_where(c.other_split, c.other_labels)})" for c in items[:limit]]
                if len(items) > limit:
                    lines.append(f"  ... and {len(items) - limit} more")
        return lines


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
    with store.write() as conn:
        return _ensure_dataset(store, conn, name, class_names, multi_label)


def _ensure_dataset(store: Store, conn: sa.Connection, name: str, class_names: list[str], multi_label: bool) -> int:
    """`ensure_dataset` inside the caller's write transaction."""
    check_dataset_name(name)
    conn.execute(
        insert_ignoring_conflicts(store, datasets, "name"),
        {"name": name, "created_at": datetime.now(timezone.utc), "class_names": class_names, "multi_label": multi_label},
    )
    # FOR NO KEY UPDATE: serializes class-name merges, but not the foreign-key checks (FOR KEY SHARE)
    # of other ingests' image inserts, which may hold blob locks this transaction waits for next
    row = conn.execute(
        sa.select(datasets.c.id, datasets.c.class_names, datasets.c.multi_label)
        .where(datasets.c.name == name)
        .with_for_update(key_share=True)
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


# What to do about an image over ingest's pixel limit: `imagerec ingest` has no flag for it (the
# decode path's own hint names --max-pixels, which ingest does not take).
INGEST_PIXELS_HINT = ("if the image is genuine, raise the limit with imagerec ingest --max-pixels N "
                      "(max_pixels= in Python); training on it then needs --max-pixels N too")


def probe_image(data: bytes, name: str, max_pixels: int | None = None) -> tuple[int, int, str, str]:
    """(width, height, mode, format) of encoded image bytes, after checking that they fully decode
    and have at most `max_pixels` pixels (None: the decode path's default limit)."""
    from imagerec.data.decode import (
        DEFAULT_MAX_PIXELS,
        PIL_FORMATS,
        DecodeError,
        check_pixels,
        decode_errors,
        not_readable_message,
        pil_open,
        sniff_format,
    )

    if not data:
        raise DecodeError(f"{name}: empty file (0 bytes)")
    # The formats training, predict and the server read (by magic bytes), no others: a TGA or ICO that
    # Pillow opens would be stored, then skipped as unreadable by every run that reads the dataset.
    kind = sniff_format(data)
    if kind is None:
        raise DecodeError(not_readable_message(name, data))
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    # pil_open: the one limit is `limit`, checked here with imagerec's message (PIL's own would refuse
    # images over twice its default with its text, and warn with its source file and line below that)
    with decode_errors(name), pil_open(data, limit, PIL_FORMATS[kind]) as img:
        w, h = img.size
        check_pixels(name, (w, h), limit, INGEST_PIXELS_HINT)
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


def _prepare(spec: DataSpec, split: str, item: Item, name: str, max_pixels: int | None = None) -> dict[str, Any]:
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
    width, height, mode, fmt = probe_image(data, name, max_pixels)
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "data": data,
        "original_path": name,
        "width": width,
        "height": height,
        "mode": mode,
        "format": fmt,
        "labels": _labels(spec, item),
        "split": split,
    }


def _labels(spec: DataSpec, item: Item) -> list[str]:
    target = item.target
    return [spec.class_names[k] for k in (target if isinstance(target, tuple) else (target,))]


def _same_place(labels_a: list[str] | tuple[str, ...], split_a: str, labels_b: list[str] | tuple[str, ...], split_b: str) -> bool:
    return split_a == split_b and sorted(labels_a) == sorted(labels_b)


def _batches(
    spec: DataSpec, pairs: list[tuple[str, Item]], batch_size: int, report: IngestReport, max_pixels: int | None = None
) -> Iterator[list[dict[str, Any]]]:
    """Batches of readable images, each the first copy of its bytes in this run; later copies are
    counted (and compared with the first) here, however many batches apart they are."""
    from imagerec.data.decode import DecodeError

    first_copy: dict[str, int] = {}  # sha256 -> index in `pairs` (~200 bytes an image)
    batch: list[dict[str, Any]] = []
    size = 0
    for index, (split, item) in enumerate(pairs):
        report.seen += 1
        name = item_name(spec, item)
        try:
            row = _prepare(spec, split, item, name, max_pixels)
        except DecodeError as e:
            report.skipped.append((name, str(e)))
            continue
        first = first_copy.setdefault(row["sha256"], index)
        if first != index:
            report.duplicates += 1
            first_split, first_item = pairs[first]
            first_labels = _labels(spec, first_item)
            if not _same_place(row["labels"], split, first_labels, first_split):
                report.source_conflicts.append(LabelConflict(
                    name, tuple(row["labels"]), split, item_name(spec, first_item), tuple(first_labels), first_split
                ))
            continue
        batch.append(row)
        size += len(row["data"])
        if len(batch) >= batch_size or size >= MAX_BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@dataclass
class _Target:
    """The dataset an ingest writes to; `id` is None until the first batch has created it."""

    name: str
    class_names: list[str]
    multi_label: bool
    id: int | None = None


@dataclass
class BatchResult:
    """What `write_batch` did: rows inserted, and stored rows whose labels/split differed from the batch's."""

    inserted: list[dict[str, Any]]
    differing: list[LabelConflict]


def write_batch(store: Store, target: _Target, batch: list[dict[str, Any]], update: bool = False) -> BatchResult:
    """One transaction: create the dataset if needed (class names extended), store the batch's images
    not yet in it with their blobs, and with `update` rewrite labels, split and original path of the
    stored ones that differ. `batch` holds distinct sha256s.
    """
    with store.write() as conn:
        dataset_id = target.id
        if dataset_id is None:
            dataset_id = _ensure_dataset(store, conn, target.name, target.class_names, target.multi_label)
        stored = {
            r.sha256: r
            for r in conn.execute(
                sa.select(images.c.sha256, images.c.labels, images.c.split, images.c.original_path)
                .where(images.c.dataset_id == dataset_id, images.c.sha256.in_([r["sha256"] for r in batch]))
            )
        }
        new = [row for row in batch if row["sha256"] not in stored]
        changed = [
            (row, old)
            for row in batch
            if (old := stored.get(row["sha256"])) is not None
            and not _same_place(row["labels"], row["split"], old.labels, old.split)
        ]
        if update and changed:
            conn.execute(
                sa.update(images)
                .where(images.c.dataset_id == dataset_id, images.c.sha256 == sa.bindparam("b_sha256"))
                .values(labels=sa.bindparam("b_labels"), split=sa.bindparam("b_split"), original_path=sa.bindparam("b_path")),
                [{"b_sha256": row["sha256"], "b_labels": row["labels"], "b_split": row["split"], "b_path": row["original_path"]}
                 for row, _ in changed],
            )
        inserted: set[str] = set()
        if new:
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
    target.id = dataset_id  # only once committed
    differing = [
        LabelConflict(row["original_path"], tuple(row["labels"]), row["split"], old.original_path, tuple(old.labels), old.split)
        for row, old in changed
    ]
    return BatchResult([r for r in new if r["sha256"] in inserted], differing)


def ingest(
    store: Store,
    source: str,
    dataset: str,
    split: str | None = None,
    batch_size: int = 500,
    progress: bool = True,
    update: bool = False,
    data_dir: str | None = None,
    max_pixels: int | None = None,
) -> IngestReport:
    """Copy the images of `source` (any DATA that `read_data` accepts) into `dataset` in the store.

    Images are stored once per dataset by the sha256 of their bytes (array sources such as IDX
    or CIFAR batches as PNG). Unreadable files are skipped and listed in the report. With
    `split`, only that split of the source is ingested (a source with no split layout is stored
    under it). Images already stored with other labels or another split are kept as stored and
    reported, unless `update` is true: then they get the source's labels, split and path. Files the
    reader leaves out (a class only val/test have, a manifest row whose file is missing) are not
    `seen`; its notes about them are in `notes`. Images over `max_pixels` pixels (None: the default
    limit train applies, `DEFAULT_MAX_PIXELS`) are skipped as possible decompression bombs. Safe to
    interrupt at any point and to run again, or concurrently; a dataset is created by the first
    batch that stores an image in it.

    Example:
        >>> with open_store("/tmp/store.db") as store:
        ...     report = ingest(store, "mnist-mini", "mnist-mini", progress=False)
        >>> report.added
        7000
    """
    from imagerec.data import read_data

    if batch_size < 1:
        raise ImageRecError(f"batch_size must be at least 1, got {batch_size}")
    if max_pixels is not None:
        check_count(max_pixels, "max_pixels")
    check_dataset_name(dataset)
    start = time.perf_counter()
    spec = read_data(source, data_dir=data_dir)
    pairs = _select_items(spec, split)
    report = IngestReport(dataset=dataset, source=source, update=update, notes=list(spec.notes))
    target = _Target(dataset, list(spec.class_names), spec.multi_label)
    added: Counter[str] = Counter()
    bar = _progress_bar() if progress else None
    with bar or nullcontext():
        task = bar.add_task(f"ingest {dataset}", total=len(pairs)) if bar is not None else None
        for batch in _batches(spec, pairs, batch_size, report, max_pixels):
            result = write_batch(store, target, batch, update=update)
            report.added += len(result.inserted)
            (report.relabelled if update else report.stored_conflicts).extend(result.differing)
            # rows another ingest inserted after our query count as already there
            report.already_present += len(batch) - len(result.inserted) - len(result.differing)
            added.update(r["split"] for r in result.inserted)
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
