"""Inspect one file: read it, sniff its magic bytes, check its header, decode it, hash a thumb.

`inspect_source` is what the worker threads run. It never raises: whatever a hostile file
does, the result is a list of findings `(category, detail, extra)` for that file.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from imagerec.data.decode import PIL_FORMATS, READABLE, Source, convert_mode, display_name, pil_open, read_bytes, sniff_format
from imagerec.doctor.hashing import thumb32

Finding = tuple[str, str, dict[str, Any]]

_OTHER_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a zip archive (or Office document)"),
    (b"\x1f\x8b", "gzip data"),
    (b"<", "HTML/XML text"),
    (b"{", "JSON text"),
    (b"\x00\x00\x00\x18ftyp", "an MP4/HEIC container"),
    (b"\x00\x00\x00\x1cftyp", "an MP4/HEIC container"),
    (b"\x00\x00\x00 ftyp", "an MP4/HEIC container"),
)
_EXT_FORMATS = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".bmp": "BMP",
    ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP", ".ppm": "PPM", ".pgm": "PPM", ".pbm": "PPM", ".pnm": "PPM",
}  # fmt: skip
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass
class FileResult:
    """What one file turned out to be; `thumb` is a (32, 32) uint8 grayscale array when decodable."""

    name: str
    n_bytes: int = 0
    sha256: str | None = None
    format: str | None = None
    mode: str | None = None
    width: int | None = None
    height: int | None = None
    thumb: np.ndarray | None = field(default=None, repr=False)
    findings: list[Finding] = field(default_factory=list)

    def add(self, category: str, detail: str, **extra: Any) -> None:
        self.findings.append((category, detail, extra))


def sniff(data: bytes) -> str | None:
    """The image format named by the magic bytes at the start of `data`, else None (the decoder's table)."""
    return sniff_format(data)


def _describe_non_image(data: bytes) -> str | None:
    """'a PDF document', 'text', ... when `data` is clearly some other kind of file; None for noise."""
    for magic, what in _OTHER_MAGIC:
        if data.startswith(magic):
            return what
    head = data[:4096]
    if b"\x00" not in head:
        text = head.decode("utf-8", errors="replace")
        if sum(c.isprintable() or c in "\r\n\t" for c in text) >= 0.95 * len(text):
            return "text"
    return None


def header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) from the header alone, without PIL (whose open refuses huge images)."""
    try:
        if fmt == "PNG" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if fmt == "GIF":
            return struct.unpack("<HH", data[6:10])
        if fmt == "BMP":
            w, h = struct.unpack("<ii", data[18:26])
            return abs(w), abs(h)
        if fmt == "JPEG":
            return _jpeg_size(data)
    except struct.error:
        return None
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _SOF:
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return w, h
        i += 2 + length
    return None


def png_structure(data: bytes) -> tuple[str, str] | None:
    """Walk the PNG chunks: ('corrupt', why) on a bad CRC, ('truncated', why) if it ends early."""
    i = 8
    while i + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[i : i + 8])
        end = i + 12 + length
        if end > len(data):
            return "truncated", f"PNG data ends inside the {kind.decode('latin-1')!r} chunk ({len(data)} bytes)"
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(data[i + 4 : end - 4]) != crc:
            return "corrupt", f"bad CRC in the PNG {kind.decode('latin-1')!r} chunk at byte {i}"
        if kind == b"IEND":
            return None
        i = end
    return "truncated", f"PNG data ends before the IEND chunk ({len(data)} bytes)"


def jpeg_has_end(data: bytes) -> bool:
    """True when an end-of-image marker follows the last start-of-scan (trailing padding allowed)."""
    sos = data.rfind(b"\xff\xda")
    return sos >= 0 and data.find(b"\xff\xd9", sos) >= 0


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block must not hide the rest of the report
        return 1


def _properties(res: FileResult, img: Image.Image, data: bytes, min_side: int, max_side: int) -> None:
    w, h = img.size
    mode = img.mode
    if mode in ("CMYK", "YCCK"):
        res.add("cmyk", f"{mode} image: colours shift unless converted to RGB with a colour profile")
    png_16 = res.format == "PNG" and len(data) > 24 and data[24] == 16
    if png_16 or mode.startswith("I;16") or mode in ("I", "F"):
        res.add("sixteen_bit", f"{'16-bit' if png_16 or mode.startswith('I;16') else mode + '-mode'} image: scaled to 8 bits for training")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        res.add("alpha", f"has transparency ({mode}): composited on white for training")
    if mode in ("P", "PA"):
        res.add("palette", f"palette image ({len(img.getpalette() or []) // 3} colours)")
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        res.add("multi_frame", f"{frames} frames ({res.format}): only the first is used", frames=frames)
    orient = _orientation(img)
    if orient != 1:
        res.add("exif_rotation", f"EXIF orientation {orient}: pixels are stored rotated/flipped", orientation=orient)
    if min(w, h) < min_side:
        res.add("tiny", f"{w}x{h} pixels: smaller than {min_side} on a side", width=w, height=h)
    if max(w, h) > max_side:
        res.add("huge", f"{w}x{h} pixels: larger than {max_side} on a side", width=w, height=h)


def _classify_decode_error(e: BaseException) -> str:
    msg = str(e).lower()
    return "truncated" if "truncat" in msg or isinstance(e, EOFError) else "corrupt"


def inspect_bytes(data: bytes, name: str, max_pixels: int, min_side: int, max_side: int) -> FileResult:
    res = FileResult(name=name, n_bytes=len(data))
    if not data:
        res.add("zero_byte", "empty file (0 bytes)")
        return res
    res.sha256 = hashlib.sha256(data).hexdigest()
    fmt = sniff(data)
    if fmt is None:
        what = _describe_non_image(data)
        if what is not None:
            res.add("not_an_image", f"not an image: the file holds {what} (starts with {data[:8]!r})")
            return res
    res.format = fmt
    size = header_size(data, fmt) if fmt else None
    if size is not None and size[0] * size[1] > max_pixels:
        w, h = size
        res.width, res.height = w, h
        res.add(
            "decompression_bomb",
            f"header says {w}x{h} = {w * h} pixels, over the limit of {max_pixels}: not decoded",
            width=w, height=h,
        )  # fmt: skip
        return res
    try:
        img = pil_open(data, max_pixels)
        res.format = img.format or fmt
        res.width, res.height = img.size
        res.mode = img.mode
        if img.size[0] * img.size[1] > max_pixels:
            w, h = img.size
            res.add("decompression_bomb", f"{w}x{h} = {w * h} pixels, over the limit of {max_pixels}: not decoded")
            return res
    except Image.DecompressionBombError as e:
        res.add("decompression_bomb", f"PIL refuses to open it: {e}")
        return res
    except Image.UnidentifiedImageError:
        if fmt is None:
            res.add("corrupt", f"not recognisable image data (starts with {data[:8]!r})")
        else:
            res.add("corrupt", f"starts like a {fmt} file but PIL cannot read its header")
        return res
    except Exception as e:  # noqa: BLE001 - hostile headers raise anything; report, never crash
        res.add(_classify_decode_error(e), f"cannot read the {fmt or 'image'} header ({type(e).__name__}: {e})")
        return res

    if fmt is None or res.format not in PIL_FORMATS[fmt]:  # Pillow reads it; imagerec's decoder does not
        res.add("not_an_image", f"{res.format} data: imagerec reads {READABLE} images (by their first bytes) and "
                "skips this file; convert it (e.g. to PNG)", actual_format=res.format)
        return res
    ext = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    expected = _EXT_FORMATS.get(ext)
    actual = "JPEG" if res.format == "MPO" else res.format  # MPO: a JPEG with extra frames
    if expected and actual and actual != expected:
        res.add("wrong_extension", f"{res.format} data named {ext}", actual_format=res.format)

    structural = png_structure(data) if res.format == "PNG" else None
    if structural is None and res.format in ("JPEG", "MPO") and not jpeg_has_end(data):
        structural = ("truncated", f"JPEG data ends without an end-of-image marker ({len(data)} bytes)")
    try:
        _properties(res, img, data, min_side, max_side)
        if res.format == "JPEG" and min(img.size) >= 128:
            img.draft(None, (64, 64))  # DCT-domain downscale: still reads every byte of the stream
        img.load()
    except Exception as e:  # noqa: BLE001 - a hostile file may raise anything
        cat = _classify_decode_error(e)
        if structural is not None:
            cat, why = structural
            res.add(cat, f"{why}; PIL: {e}")
        else:
            res.add(cat, f"cannot decode ({type(e).__name__}: {e})")
        return res
    if structural is not None:
        res.add(structural[0], structural[1] + " (PIL decoded it anyway, possibly with missing pixels)")
        return res
    try:
        img = ImageOps.exif_transpose(img) or img
        res.thumb = np.asarray(thumb32(convert_mode(img, 1)), dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - a hostile file may raise anything
        res.add("corrupt", f"decoded but cannot be converted ({type(e).__name__}: {e})")
    return res


def inspect_source(src: Source, max_pixels: int, min_side: int, max_side: int) -> FileResult:
    """Read and inspect one file source (path, tar or zip member); never raises."""
    name = display_name(src)
    try:
        data = read_bytes(src)  # type: ignore[arg-type]
    except Exception as e:  # noqa: BLE001 - a hostile file may raise anything
        res = FileResult(name=name)
        res.add("corrupt", f"cannot read the file ({type(e).__name__}: {e})")
        return res
    try:
        return inspect_bytes(data, name, max_pixels, min_side, max_side)
    except Exception as e:  # noqa: BLE001 - a bug or a decoder surprise on one file must not stop the check
        res = FileResult(name=name, n_bytes=len(data))
        res.add("corrupt", f"inspection failed ({type(e).__name__}: {e})")
        return res


def inspect_many(sources: list[Source], max_pixels: int, min_side: int, max_side: int) -> list[FileResult]:
    """One worker task: a chunk of sources (chunking keeps executor overhead off tiny images)."""
    return [inspect_source(s, max_pixels, min_side, max_side) for s in sources]
