"""Session 21, bug 1: an image over the pixel limit that `imagerec ingest` refuses says what the user
can do about it in ingest (which has no --max-pixels flag), and ingest applies imagerec's own limit
(not Pillow's 2x cap, nor its DecompressionBombWarning)."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image

from imagerec.cli import main
from imagerec.data.decode import PIXELS_HINT
from imagerec.store import ingest, open_store
from imagerec.store.ingest import INGEST_PIXELS_HINT
from imagerec.utils import ImageRecError


def huge_png(width: int, height: int) -> bytes:
    """A PNG header declaring width x height 1-bit pixels and one tiny IDAT: bytes, not gigabytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def folder_with_huge(tmp_path: Path, side: int) -> Path:
    root = tmp_path / "data"
    for cls, value in (("a", 0), ("b", 255)):
        (root / cls).mkdir(parents=True)
        Image.new("L", (8, 8), value).save(root / cls / "ok.png")
    (root / "a" / "huge.png").write_bytes(huge_png(side, side))
    return root


@pytest.mark.parametrize("side", [9500, 20000])  # just over the limit; over twice it (Pillow's own refusal)
def test_ingest_refuses_a_huge_image_with_a_hint_ingest_can_follow(tmp_path: Path, side: int) -> None:
    root = folder_with_huge(tmp_path, side)
    with open_store(str(tmp_path / "s.db")) as store, warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not leak
        report = ingest(store, str(root), "d", progress=False)
    assert report.added == 2
    (name, reason), = report.skipped
    assert name == str(root / "a" / "huge.png")
    assert reason == (f"{name}: {side}x{side} = {side * side} pixels exceeds the limit of 89478485 "
                      f"(possible decompression bomb); {INGEST_PIXELS_HINT}")
    assert "imagerec ingest --max-pixels N" in reason and "--max-pixels N (train" not in reason


def test_ingest_max_pixels_lets_a_genuine_large_image_through_the_limit(tmp_path: Path) -> None:
    root = folder_with_huge(tmp_path, 9500)
    with open_store(str(tmp_path / "s.db")) as store:
        report = ingest(store, str(root), "d", progress=False, max_pixels=100_000_000)
        (_, reason), = report.skipped  # past the limit it is read, and fails as the truncated stream it is
        assert "exceeds the limit" not in reason and "DecompressionBomb" not in reason
        report = ingest(store, str(root), "d", progress=False, max_pixels=50)  # 8x8 = 64 > 50: all refused
        assert report.added == 0 and len(report.skipped) == 3
        assert all("exceeds the limit of 50" in why for _, why in report.skipped)
        with pytest.raises(ImageRecError, match=r"^max_pixels must be a whole number of at least 1, got 0$"):
            ingest(store, str(root), "d", progress=False, max_pixels=0)


def test_ingest_cli_names_its_own_flag_and_the_flag_works(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = folder_with_huge(tmp_path, 9500)
    db = str(tmp_path / "s.db")
    assert main(["ingest", str(root), "--dataset", "d", "--db", db]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"exceeds the limit of 89478485 (possible decompression bomb); {INGEST_PIXELS_HINT}" in out
    assert "--max-pixels N (train" not in out
    assert main(["ingest", str(root), "--dataset", "d", "--db", db, "--max-pixels", "50"]) == 1  # 8x8 = 64 > 50
    out = " ".join(capsys.readouterr().out.split())
    assert "exceeds the limit of 50" in out and "nothing stored" in out


def test_the_decode_path_hint_says_which_commands_take_max_pixels() -> None:
    """eval, robustness and export have no --max-pixels: they apply the run's own limit."""
    assert PIXELS_HINT.startswith("if the image is genuine, raise the limit with --max-pixels N (train, predict, check")
    assert PIXELS_HINT.endswith("eval, robustness and export apply the limit the run was trained with")
