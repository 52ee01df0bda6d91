"""What the readers do not look at: every other file and folder of an image-folder source.

Readers list only files with image extensions in known split/class folders. Here the whole
tree is walked to find non-image files, empty class folders, split folders with odd names,
images the reader skipped, and class names that look like typos of each other; an archive's
member list is read for its non-image files.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from imagerec.data.decode import is_image_path
from imagerec.data.readers import SPLIT_ALIASES, class_name, hidden_path, is_broken_link, walk_files, wrapper_prefix
from imagerec.doctor.problems import Problem

_SPLITISH = re.compile(r"(^|[^a-z])(train|training|val|valid|validation|test|testing|dev|eval)([^a-z]|$)")


@dataclass
class FolderScan:
    """Problems about the tree, plus image files the reader did not list: (path, split, label)."""

    problems: list[Problem] = field(default_factory=list)
    unlisted_images: list[tuple[str, str, str | None]] = field(default_factory=list)
    class_folders: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> images
    class_paths: dict[str, str] = field(default_factory=dict)  # class -> its first folder


def suggest_split(name: str) -> str | None:
    """The split a folder name probably means ('Train ' -> 'train', 'vaidation' -> 'val')."""
    low = name.strip().lower()
    if low in SPLIT_ALIASES:
        return SPLIT_ALIASES[low]
    m = _SPLITISH.search(low.replace("-", "_"))
    if m:
        return SPLIT_ALIASES.get(m.group(2), "val" if m.group(2) in ("dev", "eval") else None)
    close = difflib.get_close_matches(low, list(SPLIT_ALIASES), n=1, cutoff=0.75)
    return SPLIT_ALIASES[close[0]] if close else None


def scan_folder(root: Path, listed: set[str]) -> FolderScan:
    """Walk `root`; `listed` holds the absolute paths of the files the reader returned."""
    scan = FolderScan()
    # image names that are broken symlinks are no images: the reader's note names them (skipped_by_reader)
    repeated: list[tuple[str, str]] = []  # linked folders the reader left out: its note names them
    files = [p for p in walk_files(root, repeated) if not (is_image_path(p.name) and is_broken_link(root.joinpath(*p.parts)))]
    images = [p for p in files if is_image_path(p.name)]
    prefix = wrapper_prefix(images)
    k = len(prefix)
    inner = [PurePosixPath(*p.parts[k:]) for p in files if p.parts[:k] == prefix and len(p.parts) > k]
    inner_images = [p for p in inner if is_image_path(p.name)]
    tops = {p.parts[0] for p in inner if len(p.parts) >= 2}
    split_mode = any(t.lower() in SPLIT_ALIASES for t in tops) and any(
        len(p.parts) >= 3 and p.parts[0].lower() in SPLIT_ALIASES for p in inner_images
    )
    base = root.joinpath(*prefix)

    def class_of(p: PurePosixPath) -> tuple[str, str | None]:
        """(split, class) the way the reader would assign it; split may be a raw odd name."""
        if split_mode:
            split = SPLIT_ALIASES.get(p.parts[0].lower(), p.parts[0])
            return split, (class_name(p.parts[1]) if len(p.parts) >= 3 else None)
        return "train", (class_name(p.parts[0]) if len(p.parts) >= 2 else None)

    # class folders and their image counts (empty ones included)
    class_dirs: dict[tuple[str, str], Path] = {}
    for d in sorted(x for x in base.iterdir() if x.is_dir() and not x.name.startswith(".")):
        if split_mode:
            for c in sorted(x for x in d.iterdir() if x.is_dir() and not x.name.startswith(".")):
                class_dirs[(SPLIT_ALIASES.get(d.name.lower(), d.name), class_name(c.name))] = c
        else:
            class_dirs[("train", class_name(d.name))] = d
    for key, d in class_dirs.items():
        scan.class_folders.setdefault(key[0], {})[key[1]] = 0
        scan.class_paths.setdefault(key[1], str(d))
    for p in inner_images:
        split, label = class_of(p)
        if label is not None and (split, label) in class_dirs:
            scan.class_folders[split][label] += 1

    left_out = {root / rel for rel, _ in repeated}
    for (split, label), d in class_dirs.items():
        if scan.class_folders[split][label] == 0 and d not in left_out:
            others = [x.name for x in walk_files(d)]
            what = f"only non-image files ({', '.join(others[:3])})" if others else "no files"
            scan.problems.append(Problem(str(d), "empty_class", f"class folder '{label}' in {split} has {what}", split, label))

    if split_mode:
        for d in sorted(x for x in base.iterdir() if x.is_dir() and not x.name.startswith(".")):
            if d.name.lower() in SPLIT_ALIASES:
                continue
            n = sum(1 for p in inner_images if p.parts[0] == d.name)
            guess = suggest_split(d.name)
            hint = f"; rename it to '{guess}'" if guess else "; move it out of the dataset or rename it"
            detail = f"'{d.name}' is not a split name the readers know (train/val/test), so its {n} image(s) are ignored{hint}"
            scan.problems.append(Problem(str(d), "odd_split_name", detail, d.name, None, extra={"suggestion": guess, "images": n}))
    else:
        for (_, label), d in class_dirs.items():
            has_subdirs = any(x.is_dir() for x in d.iterdir())
            if has_subdirs and suggest_split(label) and _SPLITISH.search(label.strip().lower().replace("-", "_")):
                detail = (
                    f"'{label}' looks like a split folder but is read as a class (the top folders are not named "
                    f"train/val/test); rename it to '{suggest_split(label)}'"
                )
                scan.problems.append(Problem(str(d), "odd_split_name", detail, None, label, extra={"suggestion": suggest_split(label)}))

    for rel in files:
        full = str(root.joinpath(*rel.parts))
        if full in listed:
            continue
        in_base = rel.parts[:k] == prefix and len(rel.parts) > k
        split, label = class_of(PurePosixPath(*rel.parts[k:])) if in_base else ("", None)
        if is_image_path(rel.name):
            scan.unlisted_images.append((full, split or "(outside)", label))
            continue
        in_class = label is not None and (split, label) in class_dirs
        detail = f"not an image file ({rel.suffix or 'no extension'}): the readers ignore it"
        sev = "warning" if in_class else "info"
        scan.problems.append(Problem(full, "non_image", detail, split or None, label, severity=sev))
    return scan


def scan_archive(path: Path, member_names: list[str]) -> list[Problem]:
    """The non-image files among an archive's file members (`DataSpec.files`), as `scan_folder`
    reports a folder's: a warning inside a folder that holds images (a class folder), info elsewhere."""
    hidden = {n for n in member_names if hidden_path(n)}
    image_dirs = {str(PurePosixPath(n).parent) for n in member_names if is_image_path(n) and n not in hidden}
    out: list[Problem] = []
    for name in member_names:
        if name in hidden or is_image_path(name):
            continue
        rel = PurePosixPath(name)
        in_class = len(rel.parts) > 1 and str(rel.parent) in image_dirs
        detail = f"not an image file ({rel.suffix or 'no extension'}): the readers ignore it"
        label = rel.parent.name if in_class else None
        out.append(Problem(f"{path}::{name}", "non_image", detail, None, label, severity="warning" if in_class else "info"))
    return out


def _only_digits_differ(a: str, b: str) -> bool:
    return re.sub(r"\d+", "#", a) == re.sub(r"\d+", "#", b)


def label_typos(names: list[str], counts: dict[str, int], where: str, folder: dict[str, str] | None = None) -> list[Problem]:
    """Pairs of class names that are probably one class spelled twice ('cat'/'Cat', 'retriever'/'retreiver').

    The problem is reported on the rarer name of the pair (the likely typo).
    """
    out: list[Problem] = []
    uniq = sorted(set(names))
    for i, a in enumerate(uniq):
        for b in uniq[i + 1 :]:
            same_case = a.casefold().strip() == b.casefold().strip()
            ratio = difflib.SequenceMatcher(None, a.casefold(), b.casefold()).ratio()
            if not same_case and (ratio < 0.85 or _only_digits_differ(a, b)):
                continue
            typo, other = (a, b) if counts.get(a, 0) <= counts.get(b, 0) else (b, a)
            why = "differ only in case/spaces" if same_case else f"similarity {ratio:.2f}"
            detail = f"class '{typo}' ({counts.get(typo, 0)} images) looks like a typo of '{other}' ({counts.get(other, 0)} images): {why}"
            path = (folder or {}).get(typo, where)
            out.append(Problem(path, "label_typo", detail, None, typo, extra={"similar_to": other}))
    return out
