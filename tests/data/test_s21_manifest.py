"""Session 21: a CSV manifest row with fewer fields than the header's columns is one error naming the
file, the line, the columns expected and the fields found."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from imagerec.data.readers import read_manifest
from imagerec.utils import ImageRecError


def _manifest(folder: Path, text: str) -> Path:
    for i in range(4):
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(folder / f"{i}.png")
    path = folder / "m.csv"
    path.write_text(text)
    return path


def test_short_row_names_file_line_columns_and_fields(tmp_path: Path) -> None:
    # the blank line 3 makes the 4th data row line 6 of the file
    path = _manifest(tmp_path, "path,label,split\n0.png,a,train\n\n1.png,b,train\n3.png,b,val\n2.png\n")
    with pytest.raises(ImageRecError) as e:
        read_manifest(path)
    assert str(e.value) == (f"{path}, line 6: 1 field(s) ('2.png') but the header names 3 columns (path, label, "
                            "split), so it has no 'label', 'split'. Give the row a value for each column (separated "
                            "by commas), or remove the row")


def test_quoted_line_break_counts_in_the_line_number(tmp_path: Path) -> None:
    path = _manifest(tmp_path, 'file,class\n"0.png",a\n1.png,"b\nc"\n2.png\n')
    with pytest.raises(ImageRecError, match=r"m\.csv, line 5: 1 field\(s\) \('2\.png'\) but the header names 2 "
                                            r"columns \(file, class\), so it has no 'class'\. "):
        read_manifest(path)


def test_row_short_of_an_optional_column_only_still_reads(tmp_path: Path) -> None:
    path = _manifest(tmp_path, "path,label,split\n0.png,a,train\n1.png,b\n2.png,a,val\n3.png,b,val\n")
    spec = read_manifest(path)
    assert spec.counts() == {"train": 2, "val": 2} and spec.class_names == ["a", "b"]
