"""A class folder that links to a folder already read is left out with a note, never silently."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from imagerec.data import read_data
from imagerec.doctor import check_data


def _tree(root: Path) -> None:
    rng = np.random.default_rng(1)
    for split, cls in (("train", "cat"), ("train", "dog"), ("val", "dog")):
        for i in range(2):
            p = root / split / cls / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(p)
    (root / "val" / "cat").symlink_to(Path("..") / "train" / "cat", target_is_directory=True)


def test_a_link_to_a_folder_already_read_is_named_in_a_note(tmp_path: Path) -> None:
    _tree(tmp_path / "data")
    spec = read_data(str(tmp_path / "data"))
    assert spec.counts() == {"train": 4, "val": 2}  # read once: train's cats are not val's too
    assert len(spec.notes) == 1
    assert "left out 1 folder(s) that are symbolic links to a folder already read" in spec.notes[0]
    assert "val/cat (= train/cat)" in spec.notes[0]


def test_check_does_not_call_the_linked_folders_images_non_images(tmp_path: Path) -> None:
    _tree(tmp_path / "data")
    report = check_data(str(tmp_path / "data"))
    found = {(p.category, p.path) for p in report.problems}
    assert ("empty_class", str(tmp_path / "data" / "val" / "cat")) not in found
    assert [p.category for p in report.problems] == ["skipped_by_reader"]
