"""Request bodies -> uploads -> uint8 tensors, with a precise 4xx for every way an input can be bad.

Runs in the decode thread pool, never on the event loop. Errors name the image by index and, when
the client gave one, by file name.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from imagerec.data.decode import PIL_FORMATS, DecodeError, not_readable_message, pil_open
from imagerec.serve.errors import ApiError
from imagerec.serve.limits import sniff_image_type

log = logging.getLogger("imagerec.serve")

IMAGE_FIELDS = ("file", "files")
MAX_OTHER_FIELDS = 16
_PIL_FORMATS = {kind.lower(): set(names) for kind, names in PIL_FORMATS.items()}
_DATA_URL = re.compile(rb"^data:[\w/+.-]*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(rb"\s+")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass
class Upload:
    index: int
    name: str | None
    data: bytes

    @property
    def label(self) -> str:
        return f"image {self.index}" + (f" ('{self.name}')" if self.name else "")


@dataclass
class Prepared:
    tensor: torch.Tensor  # uint8 (C, H, W)
    sha256: str
    format: str
    width: int
    height: int


def clean_name(name: str | None) -> str | None:
    """A client-given file name made safe to echo and log: printable, at most 200 characters."""
    if not name:
        return None
    return _UNPRINTABLE.sub("?", name)[:200]


def parse_body(body: bytes, content_type: str | None, max_files: int) -> list[Upload]:
    """The images of a request: multipart field `file` (repeatable) or JSON {"images": [base64, ...]}."""
    mime, params = parse_options_header(content_type or "")
    mime = mime.lower()
    if mime == b"multipart/form-data":
        uploads = _parse_multipart(body, params, max_files)
    elif mime == b"application/json" or mime.endswith(b"+json"):
        uploads = _parse_json(body, max_files)
    else:
        shown = (content_type or "none")[:100]
        raise ApiError(
            415,
            "unsupported_content_type",
            f"Content-Type '{shown}' is not accepted: send multipart/form-data with the image(s) in field 'file', "
            'or application/json {"images": ["<base64>", ...]}',
        )
    if not uploads:
        raise ApiError(
            400,
            "no_images",
            "the request holds no image: send multipart/form-data with field 'file', "
            'or application/json {"images": ["<base64>", ...]}',
        )
    return uploads


def parse_and_prepare_first(
    predictor: Any, body: bytes, content_type: str | None, max_files: int, max_pixels: int
) -> tuple[list[Upload], Prepared]:
    """`parse_body`, then `prepare_image` of the first upload in the same thread: one hop to the
    decode pool for a one-image request instead of two (each hop is a thread hand-off both ways)."""
    uploads = parse_body(body, content_type, max_files)
    return uploads, prepare_image(predictor, uploads[0], max_pixels)


def _too_many(max_files: int) -> ApiError:
    return ApiError(
        413,
        "too_many_files",
        f"too many images in one request: the limit is {max_files}; split them over several requests",
    )


def _parse_multipart(
    body: bytes, params: dict[bytes, bytes], max_files: int
) -> list[Upload]:
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(
            400,
            "bad_multipart",
            "multipart body without a boundary in its Content-Type header",
        )
    uploads: list[Upload] = []
    others = 0
    part: dict[str, Any] = {}

    def on_part_begin() -> None:
        part.clear()
        part.update(
            headers=[], field=b"", value=b"", data=[], name=None, is_image=False
        )

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part["value"] += data[start:end]

    def on_header_end() -> None:
        part["headers"].append((part["field"].lower(), part["value"]))
        part["field"], part["value"] = b"", b""

    def on_headers_finished() -> None:
        nonlocal others
        disposition = next(
            (v for k, v in part["headers"] if k == b"content-disposition"), b""
        )
        _, options = parse_options_header(disposition)
        field = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        if field in IMAGE_FIELDS:
            if len(uploads) + 1 > max_files:
                raise _too_many(max_files)
            part["is_image"] = True
            part["name"] = (
                clean_name(filename.decode("utf-8", "replace"))
                if filename is not None
                else None
            )
        else:
            others += 1
            if others > MAX_OTHER_FIELDS:
                raise ApiError(
                    400,
                    "bad_multipart",
                    f"too many non-image form fields (limit {MAX_OTHER_FIELDS}); images go in field 'file'",
                )

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if part.get("is_image"):
            part["data"].append(data[start:end])

    def on_part_end() -> None:
        if part.get("is_image"):
            uploads.append(Upload(len(uploads), part["name"], b"".join(part["data"])))

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except FormParserError as e:
        raise ApiError(400, "bad_multipart", f"malformed multipart body: {e}") from e
    if parser.state != MultipartState.END:  # finalize() drops an unfinished part without a word
        raise ApiError(
            400,
            "bad_multipart",
            f"malformed multipart body: the body ends before the closing boundary "
            f"'--{boundary[:70].decode('latin-1')}--' (an upload cut short?); send the whole form",
        )
    if not uploads and others:
        raise ApiError(
            400,
            "no_images",
            "the multipart body has no field named 'file': put each image in a 'file' field",
        )
    return uploads


def _parse_json(body: bytes, max_files: int) -> list[Upload]:
    try:
        doc = json.loads(body)
    except (
        ValueError,
        RecursionError,
    ) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ApiError(
            400, "invalid_json", f"the body is not valid JSON: {e}"[:300]
        ) from e
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list) or not all(isinstance(s, str) for s in images):
        raise ApiError(
            400,
            "invalid_json",
            'expected a JSON object {"images": ["<base64>", ...]} (a list of base64 strings)',
        )
    if len(images) > max_files:
        raise _too_many(max_files)
    names = doc.get("names")
    if names is not None and (
        not isinstance(names, list)
        or len(names) != len(images)
        or not all(isinstance(n, str) for n in names)
    ):
        raise ApiError(
            400,
            "invalid_json",
            "'names', when given, must be a list of strings, one per image",
        )
    uploads = []
    for i, text in enumerate(images):
        name = clean_name(names[i]) if names else None
        uploads.append(Upload(i, name, decode_base64(text, Upload(i, name, b"").label)))
    return uploads


def decode_base64(text: str, label: str) -> bytes:
    """Standard or URL-safe base64, with or without a data: URL prefix; whitespace ignored."""
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError as e:
        raise ApiError(
            400,
            "bad_base64",
            f"{label}: not valid base64 (non-ASCII character at position {e.start})",
        ) from e
    raw = _WHITESPACE.sub(b"", _DATA_URL.sub(b"", raw, count=1))
    if b"-" in raw or b"_" in raw:
        raw = raw.replace(b"-", b"+").replace(b"_", b"/")
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, "bad_base64", f"{label}: not valid base64 ({e})") from e


def prepare_image(predictor: Any, up: Upload, max_pixels: int) -> Prepared:
    """Check one upload (type by magic bytes, pixel count) and preprocess it with the model's own config.

    The pixel limit is the server's `max_pixels` or the model's own (its training `--max-pixels`,
    which eval and predict apply), whichever is lower."""
    model_limit = getattr(predictor, "max_pixels", max_pixels)
    limit_name = "the model's own, from its training --max-pixels" if model_limit < max_pixels else "serve --max-pixels"
    max_pixels = min(max_pixels, model_limit)
    data = up.data
    if not data:
        raise ApiError(400, "empty_file", f"{up.label}: empty file (0 bytes)")
    kind = sniff_image_type(data)
    if kind is None:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"{not_readable_message(up.label, data)}; the type is read from the file's content, not its name or "
            "Content-Type",
        )
    try:
        # pil_open lifts PIL's own cap (~179 M pixels, which would refuse images --max-pixels allows,
        # with PIL's text): max_pixels, checked below on the header's size, is the one limit
        with pil_open(data, max_pixels) as im:
            (width, height), fmt = im.size, im.format
    except UnidentifiedImageError as e:  # its message names a BytesIO object at some address
        raise ApiError(
            422,
            "undecodable_image",
            f"{up.label}: starts like a {kind.upper()} file but its header cannot be read; "
            "the file is damaged or not a real image",
        ) from e
    except (
        Exception
    ) as e:  # any failure to parse a client's header is the client's input
        raise ApiError(
            422,
            "undecodable_image",
            f"{up.label}: looks like {kind.upper()} but cannot be read ({type(e).__name__}: {e})"[
                :500
            ],
        ) from e
    if width * height > max_pixels:
        raise ApiError(
            413,
            "too_many_pixels",
            f"{up.label}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} ({limit_name}; "
            "possible decompression bomb)",
        )
    if fmt not in _PIL_FORMATS[kind]:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"{up.label}: starts like {kind.upper()} but decodes as {fmt}; send a plain image file",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            tensor = predictor.preprocess(data)
    except DecodeError as e:
        raise ApiError(
            422,
            "undecodable_image",
            f"{up.label}: {str(e).removeprefix('upload: ')}"[:500],
        ) from e
    except (
        Exception
    ) as e:  # a decoder crash on hostile bytes is still the input's fault; keep a trace
        log.warning("decoder failed on %s", up.label, exc_info=True)
        raise ApiError(
            422,
            "undecodable_image",
            f"{up.label}: cannot decode {kind.upper()} image ({type(e).__name__})",
        ) from e
    return Prepared(tensor, hashlib.sha256(data).hexdigest(), kind, width, height)
