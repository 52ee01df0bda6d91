"""A .tar.gz that cannot be unpacked into the cache blames the cache, not the (good) archive."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagerec.data import read_data
from imagerec.utils import ImageRecError


def _tgz(tmp_path: Path) -> Path:
    for c in ("cat", "dog"):
        (tmp_path / "src" / c).mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 9 if c == "cat" else 200, dtype=np.uint8)).save(tmp_path / "src" / c / "0.png")
    out = tmp_path / "data.tar.gz"
    with tarfile.open(out, "w:gz") as tf:
        tf.add(tmp_path / "src", arcname="src")
    return out


def test_an_unusable_cache_folder_is_named_and_the_archive_not_blamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _tgz(tmp_path)
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("IMAGEREC_CACHE", str(tmp_path / "afile" / "cache"))  # under a file: no folder can be made
    with pytest.raises(ImageRecError) as info:
        read_data(str(archive))
    msg = str(info.value)
    assert f"cannot unpack it into the cache folder {tmp_path / 'afile' / 'cache' / 'archives'}" in msg
    assert "set IMAGEREC_CACHE" in msg and "complete" not in msg


def test_a_truncated_archive_is_still_blamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _tgz(tmp_path)
    archive.write_bytes(archive.read_bytes()[:200])
    monkeypatch.setenv("IMAGEREC_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ImageRecError, match=r"data.tar.gz: cannot decompress .*is the archive complete\?"):
        read_data(str(archive))
    assert list((tmp_path / "cache" / "archives").iterdir()) == []  # no partial copy left
