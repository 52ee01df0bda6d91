"""Move problem files of a folder source aside (never delete, never overwrite) and back.

The manifest `<dest>/quarantine-manifest.json` is rewritten atomically before and after every
move, so after a crash it still says exactly which files were moved: an entry is "moving"
before its move and "moved" after ("failed" when the move did not happen, with its reason);
`undo_quarantine` checks where each file really is. Files that are not moved (their real file is
outside the data folder, behind a symlink; a move that failed) are listed under "skipped", each
with its reason, so a quarantine never leaves a problem file behind without saying so.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagerec.data.readers import is_broken_link
from imagerec.doctor.problems import CATEGORIES, CheckReport
from imagerec.utils import ImageRecError, atomic_write, sha256_file

MANIFEST_NAME = "quarantine-manifest.json"
# why a source that is not a folder cannot be quarantined, and what to do instead
_HOW_TO_FIX = {
    "archive": "an archive: unpack it, check --fix quarantine the folder, and pack it again (or train on the folder)",
    "manifest": "a manifest: remove the problem rows (or fix their files) in the manifest",
    "arrays": "an array source (IDX or CIFAR batches): rebuild the arrays without the problem images",
    "store": ("a dataset of the image store: export it with `imagerec export-dataset`, check --fix quarantine "
              "the export, and ingest it again into a new dataset"),
}


def _write_atomic(path: Path, obj: dict[str, Any]) -> None:
    with atomic_write(path, durable=True) as f:
        json.dump(obj, f, indent=2)


def _files_to_move(report: CheckReport, categories: list[str] | None) -> tuple[dict[Path, list[str]], dict[str, str]]:
    """The real files to move (with their problem categories), and {path: why not} for the problem
    files that are left where they are."""
    root = Path(report.root).resolve()
    chosen: dict[Path, list[str]] = {}
    skipped: dict[str, str] = {}
    for p in report.problems:
        if (p.category not in categories) if categories is not None else (p.severity != "error"):
            continue
        f = Path(p.path)
        if f.is_dir():  # folders (empty_class, odd_split_name) and the dataset root stay
            continue
        if is_broken_link(f):
            skipped[p.path] = f"a broken symbolic link (its target {f.readlink()} does not exist): fix or remove the link"
            continue
        if not f.is_file():
            skipped[p.path] = "not found any more (moved or deleted since it was checked)"
            continue
        resolved = f.resolve()
        if root not in resolved.parents:  # e.g. a class folder that is a symlink to a folder elsewhere
            skipped[p.path] = (f"its real file {resolved} is outside the data folder {root} (reached through a "
                               "symbolic link), and only files inside it are moved: fix or remove it there")
            continue
        chosen.setdefault(resolved, []).append(p.category)
    return chosen, skipped


def quarantine(report: CheckReport, dest_dir: str | Path, categories: list[str] | None = None) -> Path:
    """Move every file with an error-severity problem (or one of `categories`) into `dest_dir`.

    Relative paths under the data root are kept. Refuses when the source is not a folder,
    when `dest_dir` already holds a manifest or any destination file, or lies inside the data.
    Returns the manifest path.

    Example:
        >>> manifest = quarantine(check_data("data/pets"), "pets-quarantine")
        >>> undo_quarantine(manifest)
    """
    if report.source != "folder":
        raise ImageRecError(f"{report.root}: only image folders can be quarantined, this is {_HOW_TO_FIX[report.source]}")
    root = Path(report.root).resolve()
    dest = Path(dest_dir).resolve()
    if dest == root or root in dest.parents:
        raise ImageRecError(f"{dest}: the quarantine folder must be outside the data folder {root}")
    manifest = dest / MANIFEST_NAME
    if manifest.exists():
        raise ImageRecError(f"{manifest} already exists: choose a new folder, or undo that quarantine first")
    unknown = sorted(set(categories or []) - set(CATEGORIES))
    if unknown:
        raise ImageRecError(f"unknown problem categories: {', '.join(unknown)}")
    files, skipped = _files_to_move(report, categories)
    plan = [(src, dest / src.relative_to(root)) for src in sorted(files)]
    clash = [str(d) for _, d in plan if d.exists() or d.is_symlink()]
    if clash:
        raise ImageRecError(f"refusing to overwrite {len(clash)} file(s) in {dest}, e.g. {clash[0]}; choose a new folder")
    dest.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {
        "version": 1,
        "data_root": str(root),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "categories": categories,
        "complete": False,
        "moves": [],
        "skipped": [{"path": path, "reason": why} for path, why in skipped.items()],
    }
    _write_atomic(manifest, state)
    for src, dst in plan:
        entry = {"src": str(src), "dst": str(dst), "sha256": sha256_file(src), "categories": files[src], "state": "moving"}
        state["moves"].append(entry)
        _write_atomic(manifest, state)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            raise ImageRecError(f"{dst} appeared during the quarantine; stopped, nothing overwritten")
        try:
            shutil.move(src, dst)
        except OSError as e:
            if not src.exists():
                raise
            # across filesystems a move is a copy and a delete: a full disk stops it with a partial
            # copy here and the original untouched; the copy goes, the original stays, and it is said
            dst.unlink(missing_ok=True)
            entry["state"], entry["reason"] = "failed", f"could not be moved to {dst}: {e.strerror or e}"
            state["skipped"].append({"path": str(src), "reason": entry["reason"]})
        else:
            entry["state"] = "moved"
        _write_atomic(manifest, state)
    state["complete"] = True
    _write_atomic(manifest, state)
    return manifest


@dataclass
class UndoResult:
    """What `undo_quarantine` did: restored source paths, and (path, reason) for the ones it left."""

    restored: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.skipped


def _quarantined_path(manifest: Path, state: dict[str, Any], entry: dict[str, Any]) -> Path:
    """Where the quarantined copy of `entry` is: at its recorded path, or else at the same place
    relative to the manifest (the quarantine folder was moved or renamed as a whole, e.g. to look at
    it elsewhere). The recorded path when it is in neither place."""
    dst = Path(entry["dst"])
    if dst.exists() or dst.is_symlink():
        return dst
    try:
        rel = Path(entry["src"]).relative_to(state["data_root"])
    except (KeyError, TypeError, ValueError):
        return dst
    beside = manifest.resolve().parent / rel
    return beside if beside.exists() or beside.is_symlink() else dst


def _manifest_problem(moves: Any) -> str | None:
    """What is wrong with a manifest's `moves` (each entry an object whose src, dst and sha256 are
    strings, state too when given), naming the first bad entry (1 is the first); None when nothing."""
    if not isinstance(moves, list):
        return f"'moves' must be a list of entries, not {type(moves).__name__}"
    for n, entry in enumerate(moves, 1):
        if not isinstance(entry, dict):
            return f"entry {n} is not an object: {str(entry)[:80]}"
        for key in ("src", "dst", "sha256"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                kind = "sha256 digest" if key == "sha256" else "path"
                what = "missing" if key not in entry else f"not a {kind}: {repr(entry[key])[:80]}"
                return f"entry {n}: '{key}' is {what}"
        if not isinstance(entry.get("state", ""), str):
            return f"entry {n}: 'state' is not a string: {repr(entry['state'])[:80]}"
    return None


def undo_quarantine(manifest_path: str | Path) -> UndoResult:
    """Move quarantined files back to where they came from.

    A file is only restored when its sha256 still matches the manifest and nothing has
    appeared at its original path since; the others are listed in `skipped` with the reason.
    The quarantine folder may have been moved or renamed as a whole: a file not at its recorded
    path is looked for at the same place relative to the manifest.
    """
    manifest = Path(manifest_path)
    try:
        state = json.loads(manifest.read_text(encoding="utf-8"))
        moves = state["moves"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ImageRecError(f"{manifest}: not a readable quarantine manifest ({e})") from e
    bad = _manifest_problem(moves)
    if bad:  # before any move: a manifest that is only partly readable restores nothing
        raise ImageRecError(f"{manifest}: not a readable quarantine manifest ({bad})")
    result = UndoResult()
    for entry in moves:
        src, dst = Path(entry["src"]), _quarantined_path(manifest, state, entry)
        if entry.get("state") == "restored":
            continue
        if entry.get("state") == "failed":
            result.skipped.append((str(src), f"never moved ({entry.get('reason', 'its move failed')})"))
            continue
        if entry.get("state") == "moving" and src.is_file() and sha256_file(src) == entry["sha256"]:
            why = f"; {dst} is an unfinished copy, safe to delete" if dst.exists() else ""
            result.skipped.append((str(src), f"never moved (the quarantine stopped while moving it): the original "
                                             f"is still in place, unchanged{why}"))
            continue
        if not dst.exists():
            reason = ("never moved (the quarantine stopped first)" if src.exists()
                      else f"missing from the quarantine folder (not at {dst})")
            result.skipped.append((str(src), reason))
            continue
        if src.exists() or src.is_symlink():
            result.skipped.append((str(src), "a file exists at the original path now; not overwritten"))
            continue
        if sha256_file(dst) != entry["sha256"]:
            result.skipped.append((str(src), f"{dst} changed since it was quarantined (sha256 differs)"))
            continue
        src.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(dst, src)
        entry["state"] = "restored"
        _write_atomic(manifest, state)
        result.restored.append(str(src))
    return result
