"""`export_dataset`: a stored dataset back to an image folder, byte for byte."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath

import sqlalchemy as sa

from imagerec.data.decode import IMAGE_EXTENSIONS
from imagerec.store.db import Store
from imagerec.store.reader import dataset_row
from imagerec.store.schema import blobs, images
from imagerec.utils import ImageRecError, atomic_write, staging_dir, write_error_text

# Every stored format gets an extension the readers list (PPM and MPO, a JPEG with extra frames,
# became `.img` files that reading the export back left out); the PPM family by its magic bytes.
EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}
PNM_EXTENSIONS = {b"P1": ".pbm", b"P4": ".pbm", b"P2": ".pgm", b"P5": ".pgm", b"P3": ".ppm", b"P6": ".ppm"}
IMAGE_SUFFIXES = IMAGE_EXTENSIONS  # an original name that the readers list is kept
UNLABELED = "_unlabeled"

log = logging.getLogger("imagerec")


def _safe_part(text: str) -> str:
    """A label or split as one safe path component."""
    part = re.sub(r"[/\\\x00]", "_", text).strip()
    return "_" if part in ("", ".", "..") else part


def label_folders(labels: Iterable[str]) -> tuple[dict[str, str], list[list[str]]]:
    """A distinct folder name for every label, and the groups of labels that `_safe_part` alone would
    put in one folder (e.g. 'cat' and 'cat ', or 'a/b' and 'a_b').

    In such a group the label that is already a safe name keeps it and every other one gets
    `<safe name>-<first 8 hex digits of the label's sha256>`: the same names on every export, and
    whatever other labels the dataset has.
    """
    groups: dict[str, list[str]] = {}
    for label in sorted(set(labels)):
        groups.setdefault(_safe_part(label), []).append(label)
    taken = set(groups)
    folders: dict[str, str] = {}
    clashes: list[list[str]] = []
    for part, members in groups.items():
        if len(members) > 1:
            clashes.append(members)
        for label in members:
            if len(members) == 1 or label == part:
                folders[label] = part
                continue
            digest = hashlib.sha256(label.encode()).hexdigest()
            folder = next(f"{part}-{digest[:n]}" for n in (8, 16, 64) if f"{part}-{digest[:n]}" not in taken)
            taken.add(folder)
            folders[label] = folder
    return folders, clashes


def _file_name(original_path: str, sha256: str, fmt: str, data: bytes = b"") -> str:
    """The original basename when the readers list it, else the sha256 prefix and the format's extension."""
    base = PureWindowsPath(PurePosixPath(original_path.split("::")[-1]).name).name
    if base.lower().endswith(IMAGE_SUFFIXES) and not base.startswith("."):
        return base
    ext = PNM_EXTENSIONS.get(data[:2], ".ppm") if fmt.upper() == "PPM" else EXTENSIONS.get(fmt.upper(), ".img")
    return sha256[:16] + ext


def _check_out_dir(out: Path) -> Path:
    """`out` must be new or an existing empty folder; an error naming the path that is in the way
    otherwise. Returns the folder to replace: `out`, or for a symbolic link to an empty folder, that
    folder (the export goes through the link, which is kept)."""
    if out.is_symlink():
        target = os.readlink(out)
        if not out.exists():
            raise ImageRecError(f"{out} is a symbolic link to {target}, which does not exist: export into a new or "
                                "empty folder (or create that folder first)")
        if not out.is_dir() or any(out.iterdir()):
            raise ImageRecError(f"{out} exists and is not an empty folder: export into a new or empty folder")
        return out.resolve()
    if out.exists():
        if not out.is_dir() or any(out.iterdir()):
            raise ImageRecError(f"{out} exists and is not an empty folder: export into a new or empty folder")
        return out
    for parent in out.parents:  # the nearest existing one must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise ImageRecError(f"cannot create {out}: {parent} is a file, not a folder; export into a new or empty folder")
            break
    return out


def _staging_dir(out: Path) -> Path:
    """`utils.staging_dir` with the message this command gives when it cannot create it."""
    try:
        return staging_dir(out, "an export-dataset")
    except OSError as e:
        raise ImageRecError(f"cannot create {out}: {e.strerror or e}; export into a new or empty folder you can write to") from e


def export_dataset(store: Store, name: str, out_dir: str | Path) -> int:
    """Write dataset `name` to `out_dir/<split>/<label>/<file>`; return the number of images.

    Files keep their original basename (or a sha256 prefix for array images) and their exact
    stored bytes, each checked against its sha256. `out_dir` must be new or empty (a symbolic link
    to an empty folder: the images go into that folder, and the link stays); nothing is ever
    overwritten (a name clash gets the sha256 prefix appended). The images are written into a
    hidden folder `.OUT.partial-PID` beside `out_dir`, renamed to `out_dir` only once every image
    is there: an interrupted export (kill, full disk) never leaves a folder that looks complete,
    and the next run removes what a killed one left. Multi-label datasets file each image under its first label and also get
    `manifest.jsonl` with all labels.

    A label becomes one folder name: '/', '\\' and NUL become '_' and outer spaces are dropped. When
    that maps two labels to one name ('cat' and 'cat ', 'a/b' and 'a_b'), the classes are not
    merged: the label already safe keeps the name, the others get a suffix (`label_folders`), and a
    warning names the labels and their folders.

    Example:
        >>> export_dataset(store, "mnist-mini", "exported/")
        7000
    """
    out = Path(out_dir).expanduser()
    with store.read() as conn:
        ds = dataset_row(store, conn, name)
        used = conn.scalars(sa.select(images.c.labels).where(images.c.dataset_id == ds.id).distinct())
        folders, clashes = label_folders(labels[0] if labels else UNLABELED for labels in used)
        for group in clashes:
            log.warning(
                "labels %s of '%s' would share one folder name; exported as %s so that they stay apart",
                " and ".join(repr(label) for label in group), name,
                ", ".join(f"{label!r} -> {folders[label]}/" for label in group),
            )
        dest = _check_out_dir(out)
        # absolute: OUT may be '.', an empty working folder; beside `dest`: the rename stays on one filesystem
        tmp = _staging_dir(dest.absolute())
        try:
            count = _write_images(store, conn, ds, folders, tmp)
            os.replace(tmp, dest)  # an empty folder at `dest` is replaced too; a non-empty one makes this fail
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise ImageRecError(f"cannot export to {out}: {where}{write_error_text(e)}, or export into another new or "
                                "empty folder; nothing was exported") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return count


def _write_images(store: Store, conn: sa.Connection, ds: sa.Row, folders: dict[str, str], out: Path) -> int:
    """Write every image of dataset row `ds` (and a multi-label manifest) into `out`; the count."""
    count = 0
    manifest: list[dict] = []
    query = (
        sa.select(images.c.sha256, images.c.original_path, images.c.format, images.c.labels, images.c.split, blobs.c.data)
        .join(blobs, blobs.c.sha256 == images.c.sha256)
        .where(images.c.dataset_id == ds.id)
        .order_by(images.c.id)
    )
    for sha, original, fmt, labels, split, data in conn.execution_options(yield_per=256).execute(query):
        data = bytes(data)
        if hashlib.sha256(data).hexdigest() != sha:
            raise ImageRecError(
                f"the stored bytes of {original} (sha256 {sha}) are corrupt in {store.display_url}: "
                "re-ingest the dataset into a new store"
            )
        folder = out / _safe_part(split) / folders[labels[0] if labels else UNLABELED]
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / _file_name(original, sha, fmt, data)
        if target.exists():
            target = target.with_name(f"{target.stem}-{sha[:12]}{target.suffix}")
        with open(target, "xb") as f:  # "x": never overwrite
            f.write(data)
        if ds.multi_label:
            manifest.append({"path": target.relative_to(out).as_posix(), "labels": list(labels), "split": split})
        count += 1
    if manifest:
        with atomic_write(out / "manifest.jsonl") as f:
            f.write("".join(json.dumps(m) + "\n" for m in manifest))
    return count
