"""The data doctor counts a class folder named in either Unicode form (NFC/NFD) as the readers do."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image

from imagerec.doctor import check_data

NFC = unicodedata.normalize("NFC", "pokémon-electric-type")
NFD = unicodedata.normalize("NFD", "pokémon-electric-type")


def test_check_of_nfd_class_folders_reports_no_dropped_class_or_typo(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, name in (("train", NFD), ("val", NFC)):
        for c in (name, "dog"):
            for i in range(2):
                p = tmp_path / "data" / split / c / f"{i}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(p)
    report = check_data(str(tmp_path / "data"))
    assert [(p.category, p.detail) for p in report.problems] == []
    assert report.summary["classes"] == {"train": {NFC: 2, "dog": 2}, "val": {NFC: 2, "dog": 2}}
