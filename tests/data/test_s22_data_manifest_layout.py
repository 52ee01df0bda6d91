"""CSV manifests as spreadsheets and pandas write them, and class names spelt in either Unicode form."""

from __future__ import annotations

import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagerec.data import read_data
from imagerec.utils import ImageRecError

NFC = unicodedata.normalize("NFC", "café")
NFD = unicodedata.normalize("NFD", "café")


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)


def test_csv_header_in_any_case_and_spaces_after_commas_are_read(tmp_path: Path) -> None:
    for i in range(4):
        _png(tmp_path / "imgs" / f"{i}.png", 40 * i)
    manifest = tmp_path / "m.csv"
    manifest.write_text("Label, Path, Split\ncat, imgs/0.png, train\ndog, imgs/1.png, train\n"
                        "cat, imgs/2.png, val\ndog, imgs/3.png, val\n")
    spec = read_data(str(manifest))
    assert spec.class_names == ["cat", "dog"]
    assert spec.counts() == {"train": 2, "val": 2}
    assert spec.notes == []


def test_a_semicolon_separated_csv_names_the_separator(tmp_path: Path) -> None:
    _png(tmp_path / "0.png", 0)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path;label\n0.png;cat\n")
    with pytest.raises(ImageRecError, match=r"separated by ';', and a CSV manifest's by commas; save it with ','"):
        read_data(str(manifest))


def test_a_class_folder_in_either_unicode_form_is_one_class(tmp_path: Path) -> None:
    for split, name in (("train", NFD), ("val", NFC)):  # a Mac's folder, and one typed elsewhere
        for c in (name, "dog"):
            _png(tmp_path / "data" / split / c / "0.png", 10 if c == "dog" else 200)
            _png(tmp_path / "data" / split / c / "1.png", 20 if c == "dog" else 210)
    spec = read_data(str(tmp_path / "data"))
    assert spec.class_names == [NFC, "dog"]
    assert spec.counts() == {"train": 4, "val": 4}
    assert spec.notes == []
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as zf:
        for p in sorted((tmp_path / "data").rglob("*.png")):
            zf.write(p, p.relative_to(tmp_path).as_posix())
    spec = read_data(str(tmp_path / "data.zip"))
    assert spec.class_names == [NFC, "dog"] and spec.counts() == {"train": 4, "val": 4}


def test_manifest_labels_in_either_unicode_form_are_one_class(tmp_path: Path) -> None:
    for i in range(3):
        _png(tmp_path / f"{i}.png", 60 * i)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,label\n0.png,{NFD}\n1.png,{NFC}\n2.png,dog\n", encoding="utf-8")
    spec = read_data(str(manifest))
    assert spec.class_names == [NFC, "dog"] and not spec.multi_label


def test_no_images_error_names_every_extension_read(tmp_path: Path) -> None:
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ImageRecError, match=r"with extensions jpg, .*webp, ppm, pgm, pbm, pnm"):
        read_data(str(tmp_path / "empty"))


def test_windows_separators_in_manifest_paths_find_the_files(tmp_path: Path) -> None:
    for c in ("cat", "dog"):
        _png(tmp_path / "imgs" / c / "0.png", 10 if c == "cat" else 200)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nimgs\\cat\\0.png,cat\nimgs\\dog\\0.png,dog\nimgs\\cow\\0.png,cow\n")
    spec = read_data(str(manifest))
    assert spec.class_names == ["cat", "dog"] and spec.counts() == {"train": 2}
    assert [Path(str(it.source)) for it in spec.splits["train"]] == [tmp_path / "imgs" / "cat" / "0.png",
                                                                     tmp_path / "imgs" / "dog" / "0.png"]
    assert len(spec.notes) == 1 and spec.notes[0].startswith(f"{manifest}, row 3: file not found, skipped: ")
