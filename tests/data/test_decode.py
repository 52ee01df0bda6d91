"""The one decode path on tiny generated images: odd modes, EXIF, animation, and broken files."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagerec.data.decode import (
    ArrayRef,
    DecodeError,
    convert_mode,
    decode_bytes,
    is_image_path,
    is_refused_image_path,
    open_image,
    sniff_format,
)


def save(img: Image.Image, path: Path, **kw: object) -> Path:
    img.save(path, **kw)
    return path


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(int)


def textured(size: tuple[int, int] = (64, 48)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height 1-bit pixels, with one tiny IDAT: bytes, not gigabytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


# --- modes -----------------------------------------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)  # pure red
    assert Image.open(path).mode == "CMYK"
    img = open_image(str(path))
    assert img.mode == "RGB" and img.size == (16, 16)
    assert np.abs(pixels(img) - [255, 0, 0]).max() <= 6


def test_16bit_grayscale_png_is_scaled(tmp_path: Path) -> None:
    ramp = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16)  # 0..65535
    path = save(Image.fromarray(ramp), tmp_path / "ramp16.png")
    assert Image.open(path).mode.startswith("I;16")
    img = open_image(str(path), channels=1)
    assert img.mode == "L"
    assert np.array_equal(pixels(img).ravel(), np.arange(256))
    rgb = open_image(str(path), channels=3)
    assert rgb.mode == "RGB" and np.array_equal(pixels(rgb)[..., 1].ravel(), np.arange(256))


def test_dark_16bit_png_stays_dark(tmp_path: Path) -> None:
    # 16-bit values 0..255 are under 0.4 % of full scale: they must not be read as 8-bit 0..255.
    dark = np.arange(256, dtype=np.uint16).reshape(16, 16)
    path = save(Image.fromarray(dark), tmp_path / "dark16.png")
    assert pixels(open_image(str(path), channels=1)).max() <= 1


def test_32bit_float_image_is_min_max_scaled() -> None:
    img = convert_mode(Image.fromarray(np.array([[-1.0, 0.0], [1.0, 3.0]], np.float32), "F"), 1)
    assert img.mode == "L" and pixels(img).tolist() == [[0, 64], [128, 255]]


@pytest.mark.parametrize("alpha,expected", [(0, (255, 255, 255)), (255, (255, 0, 0)), (128, (255, 127, 127))])
def test_rgba_png_is_composited_on_white(tmp_path: Path, alpha: int, expected: tuple[int, int, int]) -> None:
    path = save(Image.new("RGBA", (8, 8), (255, 0, 0, alpha)), tmp_path / "rgba.png")
    img = open_image(str(path))
    assert img.mode == "RGB"
    assert np.abs(pixels(img) - expected).max() <= 1


def test_la_png_is_composited_on_white(tmp_path: Path) -> None:
    path = save(Image.new("LA", (8, 8), (0, 0)), tmp_path / "la.png")
    assert pixels(open_image(str(path), channels=1)).min() == 255


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((3, 2), 1)
    path = save(pal, tmp_path / "pal.png", transparency=0)  # index 0 is transparent
    img = open_image(str(path))
    assert img.mode == "RGB"
    assert pixels(img)[2, 3].tolist() == [200, 100, 50]
    assert pixels(img)[0, 0].tolist() == [255, 255, 255]  # not the palette's (10, 20, 30)
    opaque = save(pal, tmp_path / "opaque.png")
    assert pixels(open_image(str(opaque)))[0, 0].tolist() == [10, 20, 30]


def test_1bit_png(tmp_path: Path) -> None:
    one = Image.new("1", (8, 8), 0)
    one.putpixel((1, 1), 1)
    path = save(one, tmp_path / "one.png")
    gray = open_image(str(path), channels=1)
    assert gray.mode == "L" and pixels(gray)[1, :3].tolist() == [0, 255, 0]
    assert pixels(open_image(str(path)))[1, 1].tolist() == [255, 255, 255]


def test_animated_gif_gives_the_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    path = save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(path).n_frames == 3
    img = open_image(str(path))
    assert img.mode == "RGB" and pixels(img)[4, 4].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    arr[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    path = save(Image.fromarray(arr), tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    assert Image.open(path).size == (40, 20)
    img = open_image(str(path))
    assert img.size == (20, 40)  # width and height swapped
    top, bottom = pixels(img)[5, 10], pixels(img)[35, 10]
    assert top[0] > 200 and top[2] < 50  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 50


@pytest.mark.parametrize("mode,value", [("RGB", (10, 200, 30)), ("L", (77,))])
def test_channels_1_and_3(tmp_path: Path, mode: str, value: tuple[int, ...]) -> None:
    path = save(Image.new(mode, (6, 4), value if mode == "RGB" else value[0]), tmp_path / "c.png")
    gray, rgb = open_image(str(path), channels=1), open_image(str(path), channels=3)
    assert gray.mode == "L" and np.asarray(gray).shape == (4, 6)
    assert rgb.mode == "RGB" and np.asarray(rgb).shape == (4, 6, 3)
    luma = round(0.299 * value[0] + 0.587 * value[1] + 0.114 * value[2]) if mode == "RGB" else value[0]
    assert abs(pixels(gray)[0, 0] - luma) <= 1
    assert pixels(rgb)[0, 0].tolist() == ([*value] if mode == "RGB" else [value[0]] * 3)


def test_array_ref() -> None:
    arrays = {"train": np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)}
    img = open_image(ArrayRef("train", 1), channels=3, arrays=arrays)
    assert img.mode == "RGB" and pixels(img)[0, 1].tolist() == [17, 17, 17]
    with pytest.raises(DecodeError, match=r"test\[0\].*not loaded"):
        open_image(ArrayRef("test", 0), arrays=arrays)


def test_draft_decodes_a_big_jpeg_smaller(tmp_path: Path) -> None:
    path = save(textured((256, 192)), tmp_path / "big.jpg")
    # the largest power-of-two reduction that keeps both sides >= 64
    assert open_image(str(path), draft_size=(64, 64)).size == (128, 96)
    assert open_image(str(path)).size == (256, 192)


# --- broken files: DecodeError naming the file ---------------------------------------------------


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    textured().save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _corrupt_png_bytes() -> bytes:
    buf = io.BytesIO()
    textured().save(buf, "PNG")
    data = bytearray(buf.getvalue())
    i = data.index(b"IDAT") + 40
    data[i : i + 8] = bytes(b ^ 0xFF for b in data[i : i + 8])  # flipped compressed data: CRC and zlib both break
    return bytes(data)


BROKEN = {
    "truncated.jpg": (lambda: _jpeg_bytes()[: len(_jpeg_bytes()) // 2], "cannot decode"),
    "corrupt.png": (_corrupt_png_bytes, "cannot decode"),
    "empty.jpg": (lambda: b"", "empty file"),
    "notes.jpg": (lambda: b"shopping list: milk, eggs\n", "not an image file"),
    "bomb.png": (lambda: huge_png(20000, 20000), "exceeds the limit of 89478485"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_file_raises_decode_error_naming_it(tmp_path: Path, name: str) -> None:
    make, what = BROKEN[name]
    path = tmp_path / name
    path.write_bytes(make())
    with pytest.raises(DecodeError, match=what) as e:
        open_image(str(path))
    assert str(e.value).startswith(str(path) + ":")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_declared_size_over_max_pixels(tmp_path: Path) -> None:
    path = tmp_path / "large.png"
    path.write_bytes(huge_png(10000, 10000))  # 1e8 pixels: over our limit, under PIL's hard one
    with pytest.raises(DecodeError, match=r"large\.png: 10000x10000 = 100000000 pixels exceeds the limit"):
        open_image(str(path))
    small = save(textured((16, 16)), tmp_path / "small.png")
    with pytest.raises(DecodeError, match=r"small\.png: 16x16 = 256 pixels exceeds the limit of 255"):
        open_image(str(small), max_pixels=255)
    assert open_image(str(small), max_pixels=256).size == (16, 16)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DecodeError, match=r"gone\.png: file not found"):
        open_image(str(tmp_path / "gone.png"))
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(DecodeError, match=r"dir\.png: is a directory"):
        open_image(str(tmp_path / "dir.png"))


def test_decode_bytes_names_the_given_name() -> None:
    with pytest.raises(DecodeError, match=r"^upload 3: not an image"):
        decode_bytes(b"GIF89a but not really", "upload 3")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_max_pixels_can_be_raised_past_pils_own_limit() -> None:
    data = huge_png(14000, 14000)  # 196M pixels: PIL refuses anything over 2 x 89.5M on open
    with pytest.raises(DecodeError, match=r"big\.png: 14000x14000 = 196000000 pixels exceeds the limit of 89478485"):
        decode_bytes(data, "big.png")  # the default limit: imagerec's own message (naming --max-pixels), not PIL's
    with pytest.raises(DecodeError, match=r"big\.png: 14000x14000 = 196000000 pixels exceeds the limit of 150000000"):
        decode_bytes(data, "big.png", max_pixels=150_000_000)
    # raised past it, the file is opened and read: this one then fails as the truncated stream it is
    with pytest.raises(DecodeError) as info:
        decode_bytes(data, "big.png", max_pixels=300_000_000)
    assert "DecompressionBomb" not in str(info.value) and "exceeds the limit" not in str(info.value)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # PIL's global is put back


# --- formats: one table (sniff_format) for every path ------------------------------------------------


@pytest.mark.parametrize(("mode", "magic"), [("RGB", b"P6"), ("L", b"P5"), ("1", b"P4")])
def test_ppm_pgm_pbm_are_read(tmp_path: Path, mode: str, magic: bytes) -> None:
    img = textured((20, 12)).convert(mode)
    path = save(img, tmp_path / {"RGB": "a.ppm", "L": "a.pgm", "1": "a.pbm"}[mode])
    assert path.read_bytes()[:2] == magic and sniff_format(path.read_bytes()) == "PPM"
    assert np.array_equal(pixels(open_image(str(path), channels=3)), pixels(convert_mode(img, 3)))
    plain = b"P3\n2 1\n255\n255 0 0 0 0 255\n"  # the ASCII variants (P1-P3) too
    assert pixels(decode_bytes(plain, "plain.ppm")).tolist() == [[[255, 0, 0], [0, 0, 255]]]
    assert is_image_path("scan.PGM") and is_image_path("x.pnm")


def test_tga_and_other_formats_without_magic_bytes_are_refused_by_name(tmp_path: Path) -> None:
    """TGA has no magic bytes (Pillow's check is loose), so it is refused everywhere, with what to do."""
    path = save(textured((8, 8)), tmp_path / "a.tga")
    assert sniff_format(path.read_bytes()) is None and Image.open(path).format == "TGA"
    with pytest.raises(DecodeError, match=r"a\.tga: not an image file imagerec reads: .* JPEG, PNG, GIF, BMP, TIFF, "
                                          r"WebP or PPM/PGM/PBM image\. TGA and other formats are not read; convert"):
        open_image(str(path))
    assert is_refused_image_path("A.TGA") and not is_image_path("a.tga")
    for data in (b"Pf\n2 1\n-1\n" + b"\x00" * 8, b"P7\nWIDTH 1\n", b"P6x"):  # not P1-P6 + whitespace
        assert sniff_format(data) is None


def test_magic_bytes_name_the_format_pillow_opens() -> None:
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM"):
        buf = io.BytesIO()
        textured((8, 8)).save(buf, fmt)
        assert sniff_format(buf.getvalue()) == fmt
        assert decode_bytes(buf.getvalue(), f"x.{fmt.lower()}").size == (8, 8)
