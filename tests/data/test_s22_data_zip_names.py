"""Zip member names in UTF-8 without the zip's UTF-8 flag (Info-ZIP `zip` on Linux and macOS)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from imagerec.data import open_image, read_data


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_utf8_member_names_without_the_flag_give_the_real_class_name(tmp_path: Path) -> None:
    path = tmp_path / "photos.zip"
    with zipfile.ZipFile(path, "w") as zf:  # ASCII placeholders, as long as the UTF-8 names they become
        for i in range(2):
            zf.writestr(f"photos/cafeXY/{i}.png", _png(10 + i))
            zf.writestr(f"photos/dog/{i}.png", _png(200 + i))
    raw = path.read_bytes()
    # 'café' as a Mac writes it (NFD: e + combining acute), in UTF-8 bytes, no flag set
    path.write_bytes(raw.replace(b"cafeXY", "cafe\u0301".encode()))
    assert not any(info.flag_bits & 0x800 for info in zipfile.ZipFile(path).infolist())
    spec = read_data(str(path))
    assert spec.class_names == ["caf\u00e9", "dog"]  # NFC; was 'cafe╠ü' (the bytes read as cp437)
    assert spec.counts() == {"train": 4}
    item = spec.splits["train"][0]
    assert spec.class_names[item.target] == "caf\u00e9"
    assert np.asarray(open_image(item.source, 1, {})).shape[:2] == (8, 8)  # still read by its zip name
