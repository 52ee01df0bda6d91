"""Session 21, serve QA bug 2: uploads are opened with PIL's own ~179 M pixel cap lifted, so the
server's --max-pixels (or the model's own, where lower) is the one limit, named in a one-line message."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch

from imagerec.serve.errors import ApiError
from imagerec.serve.inputs import Upload, prepare_image


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height (1-bit grey) and holds no rows: enough for a header read."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


class FakePredictor:
    """Stands in for a Predictor: only its pixel limit and preprocess are used by prepare_image."""

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels

    def preprocess(self, data: bytes) -> torch.Tensor:
        return torch.zeros(1, 4, 4, dtype=torch.uint8)


P200M = png_header(14200, 14200)  # 201.64 M pixels: over PIL's 2 x 89.5 M, under 400 M


def test_an_image_over_pils_cap_but_under_max_pixels_is_accepted() -> None:
    prepared = prepare_image(FakePredictor(400_000_000), Upload(0, "p200m.png", P200M), 400_000_000)
    assert (prepared.width, prepared.height) == (14200, 14200)


def test_a_refused_image_names_one_limit_the_servers() -> None:
    with pytest.raises(ApiError) as e:
        prepare_image(FakePredictor(400_000_000), Upload(0, "p200m.png", P200M), 40_000_000)
    assert (e.value.status, e.value.type) == (413, "too_many_pixels")
    assert e.value.message == ("image 0 ('p200m.png'): 14200x14200 = 201640000 pixels exceeds the limit of 40000000 "
                               "(serve --max-pixels; possible decompression bomb)")
    assert "178956970" not in e.value.message


def test_a_refused_image_names_the_models_own_limit_where_it_is_lower() -> None:
    with pytest.raises(ApiError) as e:
        prepare_image(FakePredictor(100_000_000), Upload(0, "p200m.png", P200M), 400_000_000)
    assert "exceeds the limit of 100000000 (the model's own, from its training --max-pixels;" in e.value.message
    assert "178956970" not in e.value.message
