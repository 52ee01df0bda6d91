"""`imagerec ingest` stores only images of the formats training, predict and the server read (by magic
bytes): a TGA or ICO saved under a .png name opens in Pillow, and was stored, then skipped as
unreadable by every run on the dataset. It is now skipped at ingest, with the decode path's reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from imagerec.data.decode import decode_bytes
from imagerec.store import ingest, open_store


@pytest.mark.parametrize("pil_format", ["TGA", "ICO"])
def test_a_format_imagerec_does_not_read_is_skipped_with_the_decode_paths_reason(tmp_path: Path,
                                                                                 pil_format: str) -> None:
    root = tmp_path / "data"
    for cls, value in (("a", 0), ("b", 255)):
        (root / cls).mkdir(parents=True)
        Image.new("RGB", (16, 16), (value,) * 3).save(root / cls / "ok.png")
    odd = root / "a" / "odd.png"
    Image.new("RGB", (16, 16), (90, 10, 200)).save(odd, format=pil_format)
    with pytest.raises(Exception) as decoded:  # what training would say of it
        decode_bytes(odd.read_bytes(), str(odd))
    with open_store(str(tmp_path / "s.db")) as store:
        report = ingest(store, str(root), "d", progress=False)
    assert report.added == 2
    assert report.skipped == [(str(odd), str(decoded.value))]
    assert "not an image file imagerec reads" in report.skipped[0][1]
