"""The data doctor: find every bad image before it hurts a run.

`check_data(DATA)` works on anything `read_data` accepts. Every listed file is read and
decoded in worker threads (PIL and hashlib release the GIL); a folder source is also walked
for the files and folders the readers skip, and an archive's member list is read for its
non-image files. Array sources (IDX, CIFAR batches) only get the
hash, duplicate and imbalance checks. Nothing is modified; see `quarantine` for that.

Problem categories (the strings are API; severity in brackets):

File content
    zero_byte [error]           the file is empty.
    truncated [error]           JPEG/PNG data ends early (no end marker / chunk cut off, or PIL
                                reports "image file is truncated").
    corrupt [error]             bad PNG chunk CRC, unreadable header, garbage with no known
                                format, or any other decode failure.
    not_an_image [error]        text, PDF, zip, ... behind an image extension (by magic bytes).
    wrong_extension [warning]   a real image whose format disagrees with its extension (a PNG
                                named .jpg); still usable. Key `actual_format`.
    decompression_bomb [error]  width x height > max_pixels, read from the header without
                                decoding any pixel.
Image properties (the decoder copes; you may not want them)
    exif_rotation [warning]     EXIF orientation != 1 (key `orientation`).
    cmyk [warning]              CMYK/YCCK colour.
    sixteen_bit [warning]       16-bit (or 32-bit I/F) samples.
    alpha [info]                has an alpha channel or transparency.
    palette [info]              palette ('P') image.
    multi_frame [warning]       animated GIF / multi-page file (key `frames`).
    tiny [warning]              a side < min_side.      huge [warning]  a side > max_side.
Duplicates (key `duplicate_of`: the kept copy; near ones also `distance`)
    exact_duplicate [warning]   same sha256 as an earlier file of the same split.
    near_duplicate [warning]    perceptual hash within near_dup_distance bits of an earlier
                                file of the same split (resized / re-encoded copies).
    split_leakage [error]       a val/test file whose exact copy is in train; a near copy in
                                train is the same category with severity warning (`match`
                                is "exact" or "near").
Dataset
    single_class [error]        fewer than 2 classes: nothing to tell apart (train refuses it);
                                one entry, path = the data root.
    class_imbalance [warning]   largest/smallest class count > 3 in train; one entry, path =
                                the data root, key `counts`.
    empty_class [warning]       a class folder with no image files.
    odd_split_name [warning]    a folder that is probably a split but is not read as one
                                ('Train ', 'training_set', 'vaidation'); key `suggestion`.
    label_typo [warning]        two class names that are probably the same class (case-insensitive
                                equal, or difflib ratio >= 0.85); reported on the rarer one,
                                key `similar_to`.
    non_image [warning|info]    a file without an image extension (warning inside a class folder,
                                info elsewhere, e.g. a top-level README).
    skipped_by_reader [warning] what the reader leaves out, one entry per note it gives (path =
                                the data root): images in a class only val/test have, manifest
                                rows whose file is missing or that repeat a file, images outside
                                class folders, broken symbolic links (in a folder or a tar).
                                Train, ingest and export go without them.

Every problem has path, category, severity, detail, split, label (+ the keys above).

Example:
    >>> report = check_data("path/to/images")
    >>> report.summary["problems"]
    {'truncated': 1, 'exact_duplicate': 3}
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imagerec.data import read_data
from imagerec.data.decode import DEFAULT_MAX_PIXELS, ArrayRef, Source, display_name
from imagerec.data.readers import DataSpec, single_class_message
from imagerec.doctor.hashing import (
    earliest_near_match,
    hamming,
    phash_batch,
    thumbs_from_array,
)
from imagerec.doctor.inspect import FileResult, inspect_many
from imagerec.doctor.layout import label_typos, scan_archive, scan_folder
from imagerec.doctor.problems import SEVERITY, SEVERITY_ORDER, CheckReport, Problem

_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
_CHUNK = 32


@dataclass
class _Entry:
    """One image to check, in priority order (train first): the earliest copy is the one kept."""

    path: str
    split: str
    label: str | None
    source: Source


def _source_kind(spec: DataSpec) -> str:
    if spec.arrays:
        return "arrays"
    if spec.origin.startswith("store:"):  # read_store's origin: a dataset of the image store
        return "store"
    p = Path(spec.origin)
    if p.is_dir():
        return "folder"
    return "manifest" if p.suffix.lower() in (".csv", ".jsonl", ".ndjson") else "archive"


def _label(spec: DataSpec, target: Any) -> str:
    if isinstance(target, tuple):
        return ";".join(spec.class_names[t] for t in target)
    return spec.class_names[target]


def _entry_path(spec: DataSpec, src: Source) -> str:
    return f"{spec.origin}::{src.key}[{src.index}]" if isinstance(src, ArrayRef) else display_name(src)


def _split_key(split: str) -> tuple[int, str]:
    return _SPLIT_ORDER.get(split, 3), split


def _inspect_files(entries: list[_Entry], max_pixels: int, min_side: int, max_side: int, workers: int) -> list[FileResult]:
    chunks = [[e.source for e in entries[i : i + _CHUNK]] for i in range(0, len(entries), _CHUNK)]
    args = (max_pixels, min_side, max_side)
    if workers <= 1 or len(chunks) <= 1:
        return [r for c in chunks for r in inspect_many(c, *args)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imagerec-doctor") as pool:
        return [r for rs in pool.map(inspect_many, chunks, *[[a] * len(chunks) for a in args]) for r in rs]


def _inspect_arrays(spec: DataSpec, entries: list[_Entry]) -> list[FileResult]:
    results: list[FileResult] = []
    by_key: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        assert isinstance(e.source, ArrayRef)
        by_key.setdefault(e.source.key, []).append(i)
        arr = spec.arrays[e.source.key][e.source.index]
        res = FileResult(name=e.path, n_bytes=arr.nbytes, sha256=hashlib.sha256(arr.tobytes()).hexdigest())
        res.width, res.height = arr.shape[1], arr.shape[0]
        results.append(res)
    for key, idx in by_key.items():
        thumbs = thumbs_from_array(spec.arrays[key][[entries[i].source.index for i in idx]])  # type: ignore[union-attr]
        for i, t in zip(idx, thumbs, strict=True):
            results[i].thumb = t
    return results


def _duplicates(entries: list[_Entry], results: list[FileResult], distance: int) -> list[Problem]:
    problems: list[Problem] = []
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(results):
        if r.sha256 is not None and not any(SEVERITY[f[0]] == "error" for f in r.findings):
            groups.setdefault(r.sha256, []).append(i)
    reported: set[int] = set()
    for members in groups.values():
        for pos, j in enumerate(members[1:], 1):
            e = entries[j]
            earlier = [entries[i] for i in members[:pos]]
            train = next((x for x in earlier if x.split == "train"), None)
            same = next((x for x in earlier if x.split == e.split), None)
            kept = train if (train is not None and e.split != "train") else (same or earlier[0])
            conflict = kept.label != e.label
            note = f" (labelled '{kept.label}' there, '{e.label}' here)" if conflict else ""
            extra = {"duplicate_of": kept.path, "label_conflict": conflict}
            if train is not None and e.split in ("val", "test"):
                detail = f"exact copy of train file {kept.path}: {e.split} results are inflated{note}"
                problems.append(Problem(e.path, "split_leakage", detail, e.split, e.label, extra={**extra, "match": "exact"}))
            else:
                detail = f"same bytes as {kept.path} ({kept.split}){note}"
                problems.append(Problem(e.path, "exact_duplicate", detail, e.split, e.label, extra=extra))
            reported.add(j)

    idx = [i for i, r in enumerate(results) if r.thumb is not None and i not in reported]
    if len(idx) < 2:
        return problems
    thumbs = np.stack([results[i].thumb for i in idx])  # type: ignore[misc]  # (N, 32, 32)
    hashes = phash_batch(thumbs)
    sha_ids = np.unique(np.array([results[i].sha256 or str(i) for i in idx]), return_inverse=True)[1]
    best = earliest_near_match(hashes, distance, exclude_same=sha_ids, thumbs=thumbs)
    for jj in np.flatnonzero(best >= 0):
        i, j = idx[int(best[jj])], idx[int(jj)]
        kept, e = entries[i], entries[j]
        d = hamming(int(hashes[best[jj]]), int(hashes[jj]))
        extra = {"duplicate_of": kept.path, "distance": d, "label_conflict": kept.label != e.label}
        if kept.split == "train" and e.split in ("val", "test"):
            detail = f"near copy (hash distance {d}) of train file {kept.path}"
            problems.append(Problem(e.path, "split_leakage", detail, e.split, e.label, "warning", {**extra, "match": "near"}))
        else:
            detail = f"near copy (hash distance {d}) of {kept.path} ({kept.split})"
            problems.append(Problem(e.path, "near_duplicate", detail, e.split, e.label, extra=extra))
    return problems


def _class_counts(spec: DataSpec) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for split, items in spec.splits.items():
        c: Counter[str] = Counter()
        for it in items:
            for t in it.target if isinstance(it.target, tuple) else (it.target,):
                c[spec.class_names[t]] += 1
        out[split] = {name: c.get(name, 0) for name in spec.class_names}
    return out


def _imbalance(counts: dict[str, int], root: str) -> tuple[float | None, list[Problem]]:
    nonzero = {k: v for k, v in counts.items() if v > 0}
    if len(nonzero) < 2:
        return None, []
    big = max(nonzero, key=lambda k: nonzero[k])
    small = min(nonzero, key=lambda k: nonzero[k])
    ratio = nonzero[big] / nonzero[small]
    if ratio <= 3:
        return ratio, []
    detail = (
        f"classes are imbalanced {ratio:.1f}:1 in train: '{big}' has {nonzero[big]} images, '{small}' "
        f"{nonzero[small]}; consider class weights, resampling or more data"
    )
    return ratio, [Problem(root, "class_imbalance", detail, "train", None, extra={"ratio": round(ratio, 3), "counts": counts})]


def check_data(
    data: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 8,
    max_side: int = 10000,
    near_dup_distance: int = 4,
    workers: int | None = None,
    data_dir: str | None = None,
) -> CheckReport:
    """Check every image of DATA (folder, archive, manifest, IDX/CIFAR arrays or dataset name).

    Returns a `CheckReport`: problems sorted by severity, category and path, and a summary
    (images per split and class, imbalance ratio, problems per category, throughput).
    `workers` threads decode in parallel (default: CPU count + 2, at most 16). `data_dir` is where
    dataset names are looked for first (as in `read_data`).

    Example:
        >>> report = check_data("mnist-mini")
        >>> report.summary["num_classes"], report.summary["images"]
        (10, {'train': 6000, 'test': 1000})
    """
    t0 = time.perf_counter()
    spec = read_data(data, data_dir=data_dir)
    kind = _source_kind(spec)
    root = spec.origin
    workers = workers if workers is not None else min(16, (os.cpu_count() or 1) + 2)

    entries = [
        _Entry(_entry_path(spec, it.source), split, _label(spec, it.target), it.source)
        for split in sorted(spec.splits, key=_split_key)
        for it in spec.splits[split]
    ]
    problems: list[Problem] = []
    class_names = list(spec.class_names)
    all_counts = {split: dict(c) for split, c in _class_counts(spec).items()}
    folders: dict[str, str] = {}
    n_unlisted = 0
    if kind == "folder":
        listed = {e.path for e in entries}
        scan = scan_folder(Path(root), listed)
        problems += scan.problems
        n_unlisted = len(scan.unlisted_images)
        extra = [_Entry(p, s, lab, p) for p, s, lab in scan.unlisted_images]
        entries = sorted(entries + extra, key=lambda e: (_split_key(e.split), e.path)) if extra else entries
        for split, classes in scan.class_folders.items():
            for name, n in classes.items():
                class_names.append(name)
                all_counts.setdefault(split, {}).setdefault(name, n)
        folders = scan.class_paths
    elif kind == "archive":  # the same stray files as in the folder it was packed from
        problems += scan_archive(Path(root), spec.files)

    if kind == "arrays":
        results = _inspect_arrays(spec, entries)
    else:
        results = _inspect_files(entries, max_pixels, min_side, max_side, workers)
    for e, r in zip(entries, results, strict=True):
        for category, detail, extra in r.findings:
            problems.append(Problem(e.path, category, detail, e.split, e.label, extra=dict(extra)))
    problems += _duplicates(entries, results, near_dup_distance)

    totals: Counter[str] = Counter()
    for classes in all_counts.values():
        totals.update(classes)
    problems += label_typos(class_names, dict(totals), root, folders)
    train_counts = _class_counts(spec).get("train") or next(iter(_class_counts(spec).values()), {})
    ratio, imbalance = _imbalance(train_counts, root)
    problems += imbalance
    # what the reader left out (classes only val/test have, manifest rows whose file is missing,
    # images outside class folders): the images train would silently go without
    problems += [Problem(root, "skipped_by_reader", note, None, None) for note in spec.notes]
    if len(spec.class_names) < 2:
        problems.append(Problem(root, "single_class", single_class_message(spec), None, None))

    problems.sort(key=lambda p: (SEVERITY_ORDER[p.severity], p.category, p.path))
    seconds = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "data": data,
        "source": kind,
        "images": spec.counts(),
        "images_total": sum(spec.counts().values()),
        "files_checked": len(entries),
        "unlisted_images": n_unlisted,
        "num_classes": len(spec.class_names),
        "classes": _class_counts(spec),
        "imbalance_ratio": round(ratio, 3) if ratio is not None else None,
        "problems": dict(Counter(p.category for p in problems).most_common()),
        "severity": {s: sum(p.severity == s for p in problems) for s in SEVERITY_ORDER},
        "seconds": round(seconds, 3),
        "images_per_s": round(len(entries) / seconds, 1) if seconds > 0 else None,
    }
    sources = {e.path: e.source for e in entries}
    return CheckReport(data, root, kind, problems, summary, spec=spec, sources=sources, max_pixels=max_pixels)
