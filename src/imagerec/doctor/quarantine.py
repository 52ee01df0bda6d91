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


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` names a place strictly below `folder` by its name alone: absolute, no `..`."""
    return path.is_absolute() and ".." not in path.parts and folder in path.parents


def _entry_paths(n: int, entry: dict[str, Any], root: Path, folder: Path) -> tuple[Path, Path] | str:
    """The original path of manifest entry `n` (1 is the first) and where its quarantined copy is; or,
    when the entry names a place undo must not touch, why (naming the entry).

    The original path must be inside the data folder `root` the manifest names, by name and after
    following the symbolic links of its parent folders; the copy must be inside the quarantine folder
    `folder` that holds the manifest: at its recorded path, or else at the same place relative to the
    manifest (the quarantine folder was moved or renamed as a whole, e.g. to look at it elsewhere)."""
    src, dst = Path(entry["src"]), Path(entry["dst"])
    if not _inside(src, root):
        return (f"manifest entry {n}: its original path {src} is not inside the data folder {root} that the "
                "manifest names; undo restores files only there")
    real_root, real_parent = root.resolve(), src.parent.resolve()
    if real_parent != real_root and real_root not in real_parent.parents:
        return (f"manifest entry {n}: the folder of its original path {src} is really {real_parent} (through a "
                f"symbolic link), outside the data folder {root}; undo restores files only there")
    recorded = _inside(dst, folder)
    if not (recorded and (dst.exists() or dst.is_symlink())):
        beside = folder / src.relative_to(root)  # no `..`: src was checked above
        if beside.exists() or beside.is_symlink():
            dst = beside
        elif not recorded:
            return (f"manifest entry {n}: its quarantined copy is recorded at {dst}, outside the quarantine folder "
                    f"{folder} that holds the manifest, and is not at {beside}; undo moves files only from that folder")
    real_dst = dst.resolve()
    if folder.resolve() not in real_dst.parents:
        return (f"manifest entry {n}: its quarantined copy {dst} is really {real_dst} (through a symbolic link), "
                f"outside the quarantine folder {folder}; undo moves files only from that folder")
    return src, dst


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


def _blocking_file(path: Path) -> Path | None:
    """The nearest folder above `path` that is not a folder but a file (or a broken link), if any."""
    for parent in path.parents:
        if parent.is_dir():
            return None
        if parent.exists() or parent.is_symlink():
            return parent
    return None


def undo_quarantine(manifest_path: str | Path, data: str | Path | None = None) -> UndoResult:
    """Move quarantined files back to where they came from.

    A file is only restored when its sha256 still matches the manifest and nothing has
    appeared at its original path since; the others are listed in `skipped` with the reason.
    The quarantine folder may have been moved or renamed as a whole: a file not at its recorded
    path is looked for at the same place relative to the manifest. A manifest can be edited (or come
    from elsewhere with its folder), so files are only moved from inside the folder that holds it
    and only to places inside the data folder it names; an entry naming any other place is skipped.
    `data`, when given (`imagerec check DATA --undo MANIFEST`), must be that data folder: a manifest of
    another folder restores nothing.
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
    root = Path(data_root) if isinstance(data_root := state.get("data_root"), str) else None
    if root is None or not root.is_absolute() or ".." in root.parts or root.parent == root:
        what = "missing" if "data_root" not in state else f"not the absolute path of a data folder: {data_root!r:.80}"
        raise ImageRecError(f"{manifest}: not a readable quarantine manifest ('data_root' is {what}; undo restores "
                            "files only inside the data folder it names)")
    if data is not None and Path(data).resolve() != root.resolve():
        raise ImageRecError(f"{manifest} is the quarantine manifest of {root}, not of {data}: nothing was restored "
                            f"(give --undo {manifest} alone, or the manifest of {data})")
    folder = manifest.resolve().parent
    result = UndoResult()
    for n, entry in enumerate(moves, 1):
        if entry.get("state") == "restored":
            continue
        if entry.get("state") == "failed":
            result.skipped.append((entry["src"], f"never moved ({entry.get('reason', 'its move failed')})"))
            continue
        paths = _entry_paths(n, entry, root, folder)
        if isinstance(paths, str):  # before anything at those paths is read or moved
            result.skipped.append((entry["src"], paths))
            continue
        src, dst = paths
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
        if src.is_dir() and not src.is_symlink():
            result.skipped.append((str(src), f"a folder is at the original path now; not overwritten: move that folder "
                                             f"away and undo again, or move {dst} back by hand"))
            continue
        if src.exists() or src.is_symlink():
            result.skipped.append((str(src), "a file exists at the original path now; not overwritten"))
            continue
        if sha256_file(dst) != entry["sha256"]:
            result.skipped.append((str(src), f"{dst} changed since it was quarantined (sha256 differs)"))
            continue
        blocked = _blocking_file(src)
        if blocked is not None:  # e.g. its class folder was replaced by a file of the same name
            result.skipped.append((str(src), f"{blocked} is a file now, where the folder of the original path was: "
                                             f"move that file away and undo again, or move {dst} back by hand"))
            continue
        try:
            src.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(dst, src)
        except OSError as e:  # one entry left, with why; the others are still restored
            result.skipped.append((str(src), f"could not be moved back from {dst}: {e.strerror or e}; "
                                             "fix that and undo again, or move it back by hand"))
            continue
        entry["state"] = "restored"
        _write_atomic(manifest, state)
        result.restored.append(str(src))
    return result
