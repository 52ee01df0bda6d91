"""The one decode path: every reader's item source becomes a PIL image in 'L' or 'RGB' here.

EXIF orientation is applied, and grayscale/RGB/RGBA/palette/CMYK/16-bit images are converted to
the model's channels. Anything that fails raises `DecodeError` naming the file; callers decide
whether to skip it (training) or report it (predict).

The formats read are the ones named by reliable magic bytes (`sniff_format`): JPEG, PNG, GIF,
BMP, TIFF, WebP and PPM/PGM/PBM (P1-P6). Every path uses this one table: folder and archive
listings (by extension, `IMAGE_EXTENSIONS`), decoding, `predict` and the server's type check.
Other formats Pillow can read are refused everywhere with one message: TGA has no magic bytes
(Pillow recognises it by a loose header check that arbitrary bytes can pass), and the rest are
rare enough that converting them (to PNG, say) is the clearer path.
"""

from __future__ import annotations

import contextlib
import io
import struct
import tarfile
import threading
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from imagerec.utils import ImageRecError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm")
# Image files of formats imagerec does not read: listed so that a folder's reader can say it
# skipped them, and `predict DIR` reports them, rather than leaving them out without a word.
REFUSED_IMAGE_EXTENSIONS = (".tga", ".ico", ".pcx", ".psd", ".jp2", ".j2k", ".jxl", ".heic", ".heif", ".avif",
                            ".dds", ".qoi", ".sgi", ".pfm")
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold

# Magic bytes -> format, as Pillow's own plugins recognise them; PPM also needs the whitespace
# after its two-byte magic that the format requires. PIL_FORMATS: the Pillow plugin(s) each
# format is opened with (a JPEG with extra frames opens as MPO).
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
)
PIL_FORMATS = {"JPEG": ("JPEG", "MPO"), "PNG": ("PNG",), "GIF": ("GIF",), "BMP": ("BMP",), "TIFF": ("TIFF",),
               "WEBP": ("WEBP",), "PPM": ("PPM",)}
READABLE = "JPEG, PNG, GIF, BMP, TIFF, WebP or PPM/PGM/PBM"


def sniff_format(data: bytes) -> str | None:
    """'JPEG', 'PNG', 'GIF', 'BMP', 'TIFF', 'WEBP' or 'PPM' from the leading bytes, else None."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if len(data) >= 3 and data[:2] in (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6") and data[2] in b" \t\n\r\x0b\x0c":
        return "PPM"
    return next((fmt for magic, fmt in _SIGNATURES if data.startswith(magic)), None)


@dataclass(frozen=True)
class TarMember:
    """A file inside an uncompressed tar, read by offset (a .tar.gz is first unpacked to the cache)."""

    archive: str
    name: str
    offset: int
    size: int
    copy: int = 0  # 0 for the first member of this name, 1 for the second, ... (as ZipMember)


@dataclass(frozen=True)
class ZipMember:
    """A file inside a zip. `index` is its position in the central directory: a zip may hold two
    members of one name, and reading by name would return the last one for both."""

    archive: str
    name: str
    index: int | None = None
    copy: int = 0  # 0 for the first member of this name, 1 for the second, ...


@dataclass(frozen=True)
class ArrayRef:
    """Image `index` of the in-memory uint8 array `key` (IDX files, CIFAR batches)."""

    key: str
    index: int


Source = str | TarMember | ZipMember | ArrayRef


class DecodeError(ImageRecError):
    """A single image could not be read or decoded."""


def source_name(src: Source) -> str:
    """A stable human-readable name for messages and data fingerprints."""
    if isinstance(src, str):
        return src
    if isinstance(src, TarMember | ZipMember) and src.copy:
        return f"{src.archive}::{src.name} (copy {src.copy + 1} of that name)"
    if isinstance(src, TarMember | ZipMember):
        return f"{src.archive}::{src.name}"
    if isinstance(src, ArrayRef):
        return f"{src.key}[{src.index}]"
    return str(src)  # imagerec.store.StoreBlob: "store:<sha256>"


def display_name(src: Source) -> str:
    """`source_name` for messages and reports: a stored image also shows the path it was ingested
    from. (Fingerprints keep `source_name`, so a recorded run's data does not look changed.)"""
    original = getattr(src, "original_path", "")
    return f"{original} ({src})" if original else source_name(src)


_ZIPS: dict[str, zipfile.ZipFile] = {}  # one open handle per archive per process (workers too)


def read_bytes(src: Source) -> bytes:
    if isinstance(src, str):
        with open(src, "rb") as f:
            return f.read()
    if isinstance(src, TarMember):
        with open(src.archive, "rb") as f:
            f.seek(src.offset)
            return f.read(src.size)
    if not isinstance(src, ZipMember):  # imagerec.store.StoreBlob; imported lazily (the store imports data)
        from imagerec.store.blobref import read_blob

        return read_blob(src)
    zf = _ZIPS.get(src.archive)
    if zf is None:
        zf = _ZIPS[src.archive] = zipfile.ZipFile(src.archive)
    if src.index is None:
        return zf.read(src.name)
    info = zf.infolist()[src.index]
    if info.filename != src.name:
        raise KeyError(f"member {src.index} of {src.archive} is '{info.filename}', not '{src.name}': the zip changed")
    return zf.read(info)


DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
    tarfile.TarError,
    zipfile.BadZipFile,
    KeyError,
    IndexError,
    RuntimeError,  # zipfile: an encrypted member ("password required for extraction")
    NotImplementedError,  # zipfile: a compression method it does not support
)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer/float images -> 8-bit 'L', scaled by their bit depth."""
    arr = np.asarray(img)
    if img.mode == "F":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    else:
        # 'I;16*' images always hold 0..65535 (a dark one must stay dark); 'I' images from 16-bit
        # PNGs do too, but 'I' is also used for 8-bit data, so there the range is guessed.
        sixteen = img.mode.startswith("I;16") or arr.max(initial=0) > 255
        scaled = arr.astype(np.float64) / (65535.0 if sixteen else 255.0) * 255.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def convert_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to 'L' (channels=1) or 'RGB' (channels=3); alpha is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


@contextlib.contextmanager
def decode_errors(name: str, action: str = "decode image") -> Iterator[None]:
    """Turn any exception a hostile or broken file can raise while reading or decoding into a
    DecodeError naming `name`."""
    try:
        yield
    except DecodeError:
        raise
    except FileNotFoundError as e:
        raise DecodeError(f"{name}: file not found") from e
    except IsADirectoryError as e:
        raise DecodeError(f"{name}: is a directory, not an image file") from e
    except Image.UnidentifiedImageError as e:
        raise DecodeError(f"{name}: not an image file PIL can identify (wrong type or corrupt)") from e
    except DECODE_ERRORS as e:
        raise DecodeError(f"{name}: cannot {action} ({type(e).__name__}: {e})") from e


# What a user can do about an image over the pixel limit where the decode path applies it: train,
# predict and check take --max-pixels; eval, robustness and export apply the run's own (its training
# --max-pixels). A caller whose users have other means (ingest) passes its own `hint`.
PIXELS_HINT = ("if the image is genuine, raise the limit with --max-pixels N (train, predict, check; max_pixels= "
               "in Python); eval, robustness and export apply the limit the run was trained with")


def check_pixels(name: str, size: tuple[int, int], max_pixels: int, hint: str = PIXELS_HINT) -> None:
    """Refuse an image over `max_pixels`, from its header size, before any pixel is decoded; the
    error ends with `hint`, what the user can do about it."""
    w, h = size
    if w * h > max_pixels:
        raise DecodeError(
            f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} (possible decompression bomb); {hint}"
        )


_PIL_LIMIT = threading.Lock()


def pil_open(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, formats: tuple[str, ...] | None = None) -> Image.Image:
    """`Image.open` on bytes (with only the Pillow plugins `formats`, when given), with PIL's own
    pixel limit lifted: `max_pixels` is the one limit, which callers check on the header's size.

    PIL refuses on open any image over twice its `Image.MAX_IMAGE_PIXELS`, whatever the caller's
    limit: with a raised `max_pixels` it refused images the user allowed, and at the default it
    refused them with its own text, which does not name `--max-pixels`. PIL's limit is a module
    global, so it is lifted under a lock, for the open only (the header read, where PIL checks it;
    nothing is decoded yet). Callers check `max_pixels` themselves (`check_pixels`), with a one-line
    error, so PIL's DecompressionBombWarning (which names PIL's own source file and line) is
    silenced here too; `catch_warnings` changes process-wide state, hence the lock for every open.
    `max_pixels` stays in the signature for callers that pass it.
    """
    with _PIL_LIMIT, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # the caller's check_pixels, right after, is the limit
        try:
            return Image.open(io.BytesIO(data), formats=formats)
        finally:
            Image.MAX_IMAGE_PIXELS = old


def not_readable_message(name: str, data: bytes) -> str:
    """Why `data` (a file whose magic bytes name no format imagerec reads) is refused."""
    return (f"{name}: not an image file imagerec reads: its first bytes ({data[:8].hex()}) are not those of a "
            f"{READABLE} image. TGA and other formats are not read; convert the file (e.g. to PNG)")


def decode_bytes(
    data: bytes,
    name: str,
    channels: int = 3,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Encoded image bytes -> loaded PIL image with `channels` channels; errors name `name`.

    `draft_size` lets the JPEG decoder downscale by a power of two while decoding, which is much
    faster for large photos that will be resized anyway.
    """
    if not data:
        raise DecodeError(f"{name}: empty file (0 bytes); remove it or replace it with a real image")
    kind = sniff_format(data)
    if kind is None:
        raise DecodeError(not_readable_message(name, data))
    with decode_errors(name):
        img = pil_open(data, max_pixels, PIL_FORMATS[kind])
        check_pixels(name, img.size, max_pixels)
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB" if channels == 3 else "L", draft_size)
        img.load()
        return _upright(img, channels)


def prepare_pil_image(
    img: Image.Image, name: str, channels: int = 3, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """A caller's PIL image, prepared as `decode_bytes` prepares the pixels it decodes: the pixel
    limit, EXIF orientation, conversion to `channels`. The caller's image is not changed."""
    with decode_errors(name):
        check_pixels(name, img.size, max_pixels)
        img.load()  # an image from Image.open is read here (a damaged file fails here, named)
        return _upright(img, channels)


def _upright(img: Image.Image, channels: int) -> Image.Image:
    """A loaded image, EXIF orientation applied (on a copy), in 'L' or 'RGB'."""
    img = ImageOps.exif_transpose(img) or img
    return convert_mode(img, channels)


def open_image(
    src: Source,
    channels: int = 3,
    arrays: dict[str, np.ndarray] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode `src` into a loaded PIL image with `channels` channels."""
    name = display_name(src)
    if isinstance(src, ArrayRef):
        if arrays is None or src.key not in arrays:
            raise DecodeError(f"{name}: the array this image lives in was not loaded")
        arr = arrays[src.key][src.index]
        return convert_mode(Image.fromarray(arr, "L" if arr.ndim == 2 else "RGB"), channels)
    with decode_errors(name, "read"):
        data = read_bytes(src)
    return decode_bytes(data, name, channels, max_pixels, draft_size)


def is_image_path(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def is_refused_image_path(path: str | Path) -> bool:
    """An image file of a format imagerec does not read (TGA, ICO, HEIC, ...), by its extension."""
    return str(path).lower().endswith(REFUSED_IMAGE_EXTENSIONS)
