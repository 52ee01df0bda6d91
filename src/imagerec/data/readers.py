"""Readers list `(source, label)` items and class names; they never decode images.

One reader per source kind: image folders, archives (`archive.py`), CSV/JSONL manifests, IDX
files, CIFAR batches. `read_data(DATA)` picks the reader from what DATA is (timm's `reader_factory`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from imagerec.data.decode import (
    IMAGE_EXTENSIONS,
    READABLE,
    ArrayRef,
    Source,
    is_image_path,
    is_refused_image_path,
    source_name,
)
from imagerec.data.idx import find_idx_pairs, read_cifar_dir, read_idx
from imagerec.utils import ImageRecError

log = logging.getLogger("imagerec")

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
Target = int | tuple[int, ...]


def class_name(text: str) -> str:
    """A folder name or manifest label as a class name: Unicode NFC. macOS writes folder names
    decomposed (NFD): 'café' from a Mac and 'café' typed elsewhere were two classes that print alike,
    and the val images of one were dropped as 'missing from train'."""
    return unicodedata.normalize("NFC", text)


@dataclass
class Item:
    source: Source
    target: Target


@dataclass
class DataSpec:
    """What a reader found: items per split, class names, and any in-memory arrays they point into."""

    origin: str
    class_names: list[str]
    splits: dict[str, list[Item]]
    multi_label: bool = False
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # an archive's every file and link member, in archive order: the data doctor reports the
    # non-image ones as it does a folder's stray files
    files: list[str] = field(default_factory=list)
    # what names each image's split: "folders" (<split>/<class>/<image>), "manifest" (a split column
    # or key), "files" (IDX/CIFAR file names); "" when the data names none and all of it is listed as
    # train (a plain <class>/<image> folder, a manifest without splits). Eval refuses `test` of data
    # that names splits but no test images, rather than evaluate its train images in their place.
    split_by: str = ""

    def fingerprint(self) -> str:
        """sha256 over every (split, source, label): changes when the data changes."""
        h = hashlib.sha256()
        h.update(json.dumps(self.class_names).encode())
        for split in sorted(self.splits):
            for it in self.splits[split]:
                h.update(f"{split}\t{source_name(it.source)}\t{it.target}\n".encode())
        for key in sorted(self.arrays):
            h.update(hashlib.sha256(np.ascontiguousarray(self.arrays[key]).data).digest())
        return h.hexdigest()

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.splits.items()}


def single_class_message(spec: DataSpec) -> str:
    """Why a dataset with fewer than two classes cannot train a classifier, and what to do."""
    found = ", ".join(f"'{c}'" for c in spec.class_names) or "none"
    return (
        f"{spec.origin}: {len(spec.class_names)} class(es) found ({found}); a classifier needs at least 2. "
        "Put each class's images in a folder of its own: <class>/<image> or <train|val|test>/<class>/<image>"
    )


def wrapper_prefix(paths: list[PurePosixPath]) -> tuple[str, ...]:
    """The single folders that wrap everything (e.g. `cifar10-jpg/` in `cifar10-jpg/train/cat/1.jpg`).

    A folder is a wrapper when every image inside some folder at that level lies in it, at least two
    folders deep (so what is left is still `<class>/<file>`), and it is not a split name. Files
    beside a wrapper (a stray `cover.png` next to `photos/`) do not stop it: the layout ignores
    them with a note either way, and without this rule one of them turned `photos/` into the only
    class.
    """
    prefix: tuple[str, ...] = ()
    while True:
        k = len(prefix)
        inner = [p for p in paths if len(p.parts) > k + 1 and p.parts[:k] == prefix]
        if not inner or any(len(p.parts) < k + 3 for p in inner):
            return prefix
        first = {p.parts[k] for p in inner}
        if len(first) != 1 or next(iter(first)).lower() in SPLIT_ALIASES:
            return prefix
        prefix = (*prefix, *first)


def _strip_wrapper(paths: list[PurePosixPath]) -> list[PurePosixPath]:
    """Paths relative to the wrapper folders; files outside them keep just their name (top level)."""
    prefix = wrapper_prefix(paths)
    k = len(prefix)
    return [PurePosixPath(*p.parts[k:]) if p.parts[:k] == prefix and len(p.parts) > k else PurePosixPath(p.name)
            for p in paths]


def walk_files(root: Path, repeated: list[tuple[str, str]] | None = None) -> list[PurePosixPath]:
    """Every file under `root` whose path has no hidden part, relative and sorted by path.

    Symlinked folders are followed (a class folder linked in from elsewhere is a class folder); a
    folder reached twice, through a symlink loop or two links to one place, is read once: each
    (folder left out, folder read) pair, relative to `root`, is appended to `repeated`.
    """
    out: list[PurePosixPath] = []
    seen: dict[str, str] = {}  # real path -> the relative path it was read at
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        rel = Path(dirpath).relative_to(root).as_posix()
        if real in seen:
            dirnames[:] = []
            first = seen[real]
            loop = first == "." or rel.startswith(first + "/")  # a link to a folder above it: nothing is lost
            if repeated is not None and not loop:
                repeated.append((rel, first))
            continue
        seen[real] = rel
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # the first of two links read: not os order
        rel_dir = PurePosixPath(rel)
        out.extend(rel_dir / f for f in filenames if not f.startswith("."))
    return sorted(out)


def _layout(rel_paths: list[str], origin: str) -> tuple[dict[str, list[tuple[int, str]]], list[str], list[str], bool]:
    """Group relative image paths into splits and classes.

    Returns ({split: [(path_index, class_name)]}, class names, notes, whether split folders name the
    splits). Layouts:
    `<class>/<file>` or `<split>/<class>/<file>`, optionally under one wrapping folder.
    """
    notes: list[str] = []
    paths = _strip_wrapper([PurePosixPath(p) for p in rel_paths])
    tops = {p.parts[0].lower() for p in paths if len(p.parts) >= 2}
    split_mode = any(t in SPLIT_ALIASES for t in tops) and any(
        len(p.parts) >= 3 and p.parts[0].lower() in SPLIT_ALIASES for p in paths
    )
    grouped: dict[str, list[tuple[int, str]]] = {}
    ignored: Counter[str] = Counter()
    for i, p in enumerate(paths):
        if split_mode:
            split = SPLIT_ALIASES.get(p.parts[0].lower())
            if split is None or len(p.parts) < 3:
                ignored[p.parts[0] if len(p.parts) > 1 else "(top level)"] += 1
                continue
            grouped.setdefault(split, []).append((i, class_name(p.parts[1])))
        else:
            if len(p.parts) < 2:
                ignored["(top level)"] += 1
                continue
            grouped.setdefault("train", []).append((i, class_name(p.parts[0])))
    for where, n in ignored.items():
        notes.append(f"{origin}: ignored {n} image(s) in '{where}' (not inside a class folder of a known split)")
    if not grouped:
        raise ImageRecError(
            f"{origin}: no images found in class folders. Expected <class>/<image> or "
            f"<train|val|test>/<class>/<image> with extensions {', '.join(e[1:] for e in IMAGE_EXTENSIONS)}"
        )
    source_split = "train" if "train" in grouped else sorted(grouped)[0]
    class_names = sorted({c for _, c in grouped[source_split]})
    for split, members in grouped.items():
        extra = sorted({c for _, c in members} - set(class_names))
        if extra:
            notes.append(f"{origin}: {split} has classes missing from {source_split} (dropped): {', '.join(extra)}")
            grouped[split] = [(i, c) for i, c in members if c in class_names]
    return grouped, class_names, notes, split_mode


def spec_from_layout(origin: str, sources: list[Source], rel_paths: list[str]) -> DataSpec:
    """The DataSpec of an image folder layout (a folder's or an archive's relative image paths)."""
    grouped, class_names, notes, split_mode = _layout(rel_paths, origin)
    index = {c: k for k, c in enumerate(class_names)}
    splits = {s: [Item(sources[i], index[c]) for i, c in members] for s, members in grouped.items()}
    return DataSpec(origin, class_names, splits, notes=notes, split_by="folders" if split_mode else "")


def refused_images_note(origin: str, names: list[str]) -> list[str]:
    """A note naming the image files of formats imagerec does not read (TGA, HEIC, ...), which a
    listing leaves out: never without a word."""
    refused = Counter(PurePosixPath(n).suffix.lower() for n in names if is_refused_image_path(n))
    if not refused:
        return []
    kinds = ", ".join(f"{n} {ext}" for ext, n in sorted(refused.items()))
    return [f"{origin}: left out {refused.total()} image file(s) of formats imagerec does not read ({kinds}); "
            f"it reads {READABLE}: convert them (e.g. to PNG) to use them"]


def broken_links_note(origin: str, links: list[tuple[str, str]], why: str = "whose target does not exist") -> list[str]:
    """A note naming the image paths that are links to nothing ((path, target) pairs), which a
    listing leaves out: never without a word."""
    if not links:
        return []
    shown = ", ".join(f"{p} -> {t}" for p, t in links[:5]) + (", ..." if len(links) > 5 else "")
    return [f"{origin}: left out {len(links)} broken symbolic link(s), {why}: {shown}; "
            "point them at the image or remove them"]


def is_broken_link(path: Path) -> bool:
    """A symbolic link whose target does not exist."""
    return path.is_symlink() and not path.exists()


def read_folder(root: Path) -> DataSpec:
    rel, sources, refused, broken = [], [], [], []
    repeated: list[tuple[str, str]] = []
    for r in walk_files(root, repeated):
        p = root / r
        if is_image_path(r.name) and p.is_file():
            rel.append(r.as_posix())
            sources.append(str(p))
        elif is_image_path(r.name) and is_broken_link(p):  # no image, but said so
            broken.append((r.as_posix(), os.readlink(p)))
        elif is_refused_image_path(r.name):
            refused.append(r.name)
    spec = spec_from_layout(str(root), sources, rel)
    spec.notes.extend(refused_images_note(str(root), refused))
    spec.notes.extend(broken_links_note(str(root), broken))
    if repeated:  # `val/cat -> ../train/cat`: silent, val lost its cats (and check called them non-images)
        shown = ", ".join(f"{a} (= {b})" for a, b in repeated[:5]) + (", ..." if len(repeated) > 5 else "")
        spec.notes.append(f"{root}: left out {len(repeated)} folder(s) that are symbolic links to a folder already read "
                          f"(each real folder is read once): {shown}; copy the images instead if both places need them")
    # top-level folders holding images (class folders, or a wrapper folder around the layout)
    present = {r.split("/", 1)[0] for r in rel}
    if root.is_dir():
        candidates = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
        empty = [d.name for d in candidates if d.name.lower() not in SPLIT_ALIASES and d.name not in present]
        if empty and not any(d.name.lower() in SPLIT_ALIASES for d in candidates):
            spec.notes.append(f"{root}: class folder(s) with no images, skipped: {', '.join(sorted(empty))}")
    return spec


def hidden_path(name: str) -> bool:
    """A hidden file or folder, or macOS's resource-fork folder, which the readers never list."""
    return any(part.startswith(".") or part == "__MACOSX" for part in PurePosixPath(name).parts)


def _manifest_rows(path: Path) -> tuple[list[dict], list[int]]:
    """The manifest's rows, and the line of the file each ends on."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ImageRecError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); save the manifest as UTF-8"
        ) from e
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows, lines = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ImageRecError(f"{path}, line {n}: not valid JSON ({e.msg})") from e
                lines.append(n)
        return rows, lines
    reader = csv.DictReader(text.splitlines())  # a field missing at the end of a row reads as None
    if reader.fieldnames:  # `Path,Label` (pandas, Excel) or `path, label` name the known columns too
        reader.fieldnames = [_column_name(f) for f in reader.fieldnames]
    rows, lines = [], []
    for row in reader:
        rows.append(row)
        lines.append(reader.line_num)  # blank lines and quoted line breaks make it differ from the row number
    return rows, lines


_PATH_KEYS = ("path", "file", "filename", "image")
_LABEL_KEYS = ("labels", "label", "class")


def _column_name(name: str) -> str:
    """A CSV header name as the manifest reads it: a known column in any case, outer spaces dropped."""
    low = name.strip().lower()
    return low if low in (*_PATH_KEYS, *_LABEL_KEYS, "split") else name


def _pick(row: dict, names: tuple[str, ...]) -> object:
    for n in names:
        if n in row and row[n] not in (None, ""):
            return row[n]
    return None


def _check_extra_fields(path: Path, n: int, row: dict, extra: list[str]) -> None:
    """Refuse a CSV row with more fields than its header has columns, unless the extra ones are
    empty (Excel's trailing commas): `x.png,golden retriever, large` lost ' large' without a word."""
    filled = [v for v in extra if v.strip()]
    if filled:
        raise ImageRecError(
            f"{path}, row {n}: {len(row) + len(extra)} fields but the header names {len(row)} columns "
            f"({', '.join(map(str, row))}); the extra field(s) {', '.join(map(repr, filled))} are not read. "
            'Quote a value that holds a comma ("golden retriever, large"), or name the column in the header'
        )


def _check_missing_fields(path: Path, line: int, row: dict) -> None:
    """Refuse a CSV row with fewer fields than its header has columns when that leaves it without a
    path or a label (csv reads the missing ones as None), naming the columns expected and the fields found."""
    missing = [k for k, v in row.items() if v is None]
    if not missing or (_pick(row, _PATH_KEYS) is not None and _pick(row, _LABEL_KEYS) is not None):
        return  # a full row, or one short of an optional column only (e.g. no split: train)
    found = [v for v in row.values() if v is not None]
    raise ImageRecError(
        f"{path}, line {line}: {len(found)} field(s) ({', '.join(map(repr, found)) or 'none'}) but the header names "
        f"{len(row)} columns ({', '.join(map(str, row))}), so it has no {', '.join(map(repr, missing))}. "
        "Give the row a value for each column (separated by commas), or remove the row"
    )


def _manifest_file(manifest: Path, rel: str) -> Path:
    """The file a manifest row names, relative to the manifest's folder. When the file as written
    does not exist: outer spaces are dropped (`x.png, cat`, a space after the comma, read the label,
    which is stripped, but not the file), and Windows' `\\` separators read as `/` (`imgs\\cat\\0.png`
    from a manifest written on Windows found no file at all)."""
    p = Path(rel)
    full = p if p.is_absolute() else manifest.parent / p
    if full.is_file():
        return full
    if rel != rel.strip():
        return _manifest_file(manifest, rel.strip())
    if "\\" in rel and not PureWindowsPath(rel).drive:
        alt = manifest.parent / PurePosixPath(rel.replace("\\", "/"))
        return alt if alt.is_file() else full
    return full


def read_manifest(path: Path) -> DataSpec:
    """CSV (`path,label[,split]`) or JSONL manifest. Several labels in a row (a list, or separated by
    ';' or '|') make the dataset multi-label; a label repeated in one row counts once (`3;3` is 3).
    Paths are relative to the manifest's folder."""
    rows, lines = _manifest_rows(path)
    if not rows:
        raise ImageRecError(f"{path}: the manifest has no rows")
    parsed: list[tuple[str, str, list[str]]] = []
    notes: list[str] = []
    missing = repeated = 0
    first_row: dict[str, int] = {}  # file -> the first row that lists it
    named_split = False  # some row gives a split: the manifest names its splits
    csv_rows = path.suffix.lower() not in (".jsonl", ".ndjson")
    for n, (row, line) in enumerate(zip(rows, lines, strict=True), 1):
        if not isinstance(row, dict):
            raise ImageRecError(f"{path}, row {n}: expected an object with 'path' and 'label'")
        extra = row.pop(None, None) or []  # csv fields beyond the header's columns
        if csv_rows:
            _check_missing_fields(path, line, row)
        rel = _pick(row, _PATH_KEYS)
        lab = _pick(row, _LABEL_KEYS)
        if rel is None or lab is None:
            what, keys = ("path", _PATH_KEYS) if rel is None else ("label", _LABEL_KEYS)
            present = [k for k in keys if k in row]
            if present:  # the key is there, its value is not
                raise ImageRecError(
                    f"{path}, row {n}: the {what} is empty ({', '.join(f'{k!r}: {row[k]!r}' for k in present)}); "
                    f"give every row a {what}, or remove the row"
                )
            unnamed = f" (and {len(extra)} unnamed extra field(s))" if extra else ""
            sep = next((c for c in (";", "\t") if csv_rows and len(row) == 1 and c in str(next(iter(row)))), None)
            hint = (f". The header reads as one column: its columns are separated by {sep!r}, and a CSV manifest's by "
                    "commas; save it with ',' as the separator" if sep else "")
            raise ImageRecError(f"{path}, row {n}: needs a 'path' and a 'label' column/key; found {sorted(row)}{unnamed}{hint}")
        _check_extra_fields(path, n, row, extra)
        labels = [str(x) for x in lab] if isinstance(lab, list) else [s.strip() for s in str(lab).replace("|", ";").split(";") if s.strip()]
        if not labels and not isinstance(lab, list):
            # ' ' or ';' holds no label once split and stripped: refused like '', since the empty label
            # list would otherwise silently turn the whole dataset multi-label (a JSONL [] is an explicit
            # multi-label row with no positive class, and stays)
            key = next(k for k in _LABEL_KEYS if row.get(k) is lab)
            raise ImageRecError(
                f"{path}, row {n}: the label is empty ({key!r}: {row[key]!r}); give every row a label, or remove the row"
            )
        # a class named twice in one row ('3;3', ["cat", "cat"]) is one label: kept twice it made the
        # whole dataset multi-label, with the row counted twice for that class
        labels = list(dict.fromkeys(class_name(x) for x in labels))
        named_split = named_split or row.get("split") not in (None, "")  # a row whose file is missing says so too
        full = _manifest_file(path, str(rel))
        if not full.is_file():
            missing += 1
            if missing <= 5:
                notes.append(f"{path}, row {n}: file not found, skipped: {full}")
            continue
        raw_split = str(row.get("split") or "train").strip().lower()
        if raw_split not in SPLIT_ALIASES:
            raise ImageRecError(f"{path}, row {n}: unknown split '{raw_split}'; use train, val or test")
        split = SPLIT_ALIASES[raw_split]
        key = os.path.normpath(os.path.abspath(full))
        if key in first_row:
            repeated += 1
            if repeated <= 5:
                notes.append(f"{path}, row {n}: lists the same file as row {first_row[key]} ({full}); only row {first_row[key]} is used")
            continue
        first_row[key] = n
        parsed.append((str(full), split, labels))
    if missing > 5:
        notes.append(f"{path}: {missing} files listed in the manifest were not found and were skipped")
    if repeated > 5:
        notes.append(f"{path}: {repeated} rows list a file an earlier row already lists; only the first row of each file is used")
    if not parsed:
        raise ImageRecError(f"{path}: none of the {len(rows)} files in the manifest exist (paths are relative to {path.parent})")
    multi = any(len(labels) != 1 for _, _, labels in parsed)
    by_split: dict[str, set[str]] = {}
    for _, split, labels in parsed:
        by_split.setdefault(split, set()).update(labels)
    if multi:  # an image's other labels still count: every class is kept
        class_names = sorted({lab for labs in by_split.values() for lab in labs})
    else:
        known = train_classes(str(path), by_split, notes)
        parsed = [row for row in parsed if row[2][0] in known]
        class_names = sorted(known)
    index = {c: k for k, c in enumerate(class_names)}
    splits: dict[str, list[Item]] = {}
    for full, split, labels in parsed:
        target: Target = tuple(sorted(index[x] for x in labels)) if multi else index[labels[0]]
        splits.setdefault(split, []).append(Item(full, target))
    return DataSpec(str(path), class_names, splits, multi_label=multi, notes=notes,
                    split_by="manifest" if named_split else "")


def train_classes(origin: str, labels: dict[str, set[str]], notes: list[str]) -> set[str]:
    """The class names: those of the train split, as for image folders. A class that only other
    splits have cannot be learnt; its images are dropped, with a note naming it."""
    if "train" not in labels:  # no train split: every class counts
        return {x for labs in labels.values() for x in labs}
    for split in sorted(labels):
        extra = labels[split] - labels["train"]
        if extra:
            notes.append(f"{origin}: {split} has classes missing from train (dropped): {', '.join(sorted(extra))}")
    return labels["train"]


def read_idx_dir(root: Path) -> DataSpec:
    """MNIST-style IDX files (raw or .gz); train*/t10k*/test* files become the train/test splits.
    Labels may be any integers (EMNIST letters start at 1): classes are the sorted distinct values of
    train; a label only the test file has is dropped with a note, as for image folders."""
    pairs = find_idx_pairs(root)
    images = {split: read_idx(img) for split, (img, _) in pairs.items()}
    labels = {split: read_idx(lab) for split, (_, lab) in pairs.items()}
    for split, (img_path, lab_path) in pairs.items():
        shape = images[split].shape
        if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 3)) or 0 in shape[1:] or images[split].dtype != np.uint8:
            raise ImageRecError(
                f"{img_path}: IDX images must be uint8 of shape (count, height, width) or (count, height, width, 3); "
                f"this file holds {images[split].dtype} values of shape {shape}"
            )
        if labels[split].ndim != 1 or labels[split].dtype.kind not in "iu":
            raise ImageRecError(
                f"{lab_path}: IDX labels must be one integer per image (shape (count,)); "
                f"this file holds {labels[split].dtype} values of shape {labels[split].shape}"
            )
        if len(images[split]) != len(labels[split]):
            raise ImageRecError(
                f"{pairs[split][0]}: {len(images[split])} images but {len(labels[split])} labels in {pairs[split][1]}"
            )
    notes: list[str] = []
    present = {split: {str(int(v)) for v in np.unique(arr)} for split, arr in labels.items()}
    values = sorted(int(v) for v in train_classes(str(root), present, notes))
    index = {v: k for k, v in enumerate(values)}
    splits = {
        split: [Item(ArrayRef(split, i), index[v]) for i, v in enumerate(labels[split].tolist()) if v in index]
        for split in pairs
    }
    return DataSpec(str(root), [str(v) for v in values], splits, arrays=images, notes=notes, split_by="files")


def read_cifar(root: Path) -> DataSpec:
    arrays, labels, class_names = read_cifar_dir(root)
    splits = {split: [Item(ArrayRef(split, i), int(v)) for i, v in enumerate(labels[split])] for split in arrays}
    return DataSpec(str(root), class_names, splits, arrays=arrays, split_by="files")
