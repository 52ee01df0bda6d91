"""`export_dataset`: a stored dataset back to an image folder, byte for byte."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

import sqlalchemy as sa

from imagerec.store.db import Store
from imagerec.store.reader import dataset_row
from imagerec.store.schema import blobs, images
from imagerec.utils import ImageRecError

EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _safe_part(text: str) -> str:
    """A label or split as one safe path component."""
    part = re.sub(r"[/\\\x00]", "_", text).strip()
    return "_" if part in ("", ".", "..") else part


def _file_name(original_path: str, sha256: str, fmt: str) -> str:
    base = PureWindowsPath(PurePosixPath(original_path.split("::")[-1]).name).name
    if base.lower().endswith(IMAGE_SUFFIXES) and not base.startswith("."):
        return base
    return sha256[:16] + EXTENSIONS.get(fmt.upper(), ".img")


def export_dataset(store: Store, name: str, out_dir: str | Path) -> int:
    """Write dataset `name` to `out_dir/<split>/<label>/<file>`; return the number of images.

    Files keep their original basename (or a sha256 prefix for array images) and their exact
    stored bytes, each checked against its sha256. `out_dir` must be new or empty; nothing is
    ever overwritten (a name clash gets the sha256 prefix appended). Multi-label datasets file
    each image under its first label and also get `manifest.jsonl` with all labels.

    Example:
        >>> export_dataset(store, "mnist-mini", "exported/")
        7000
    """
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ImageRecError(f"{out} exists and is not an empty folder: export into a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    manifest: list[dict] = []
    with store.read() as conn:
        ds = dataset_row(store, conn, name)
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
            folder = out / _safe_part(split) / _safe_part(labels[0] if labels else "_unlabeled")
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / _file_name(original, sha, fmt)
            if target.exists():
                target = target.with_name(f"{target.stem}-{sha[:12]}{target.suffix}")
            with open(target, "xb") as f:  # "x": never overwrite
                f.write(data)
            if ds.multi_label:
                manifest.append({"path": target.relative_to(out).as_posix(), "labels": list(labels), "split": split})
            count += 1
    if manifest:
        (out / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest))
    return count
