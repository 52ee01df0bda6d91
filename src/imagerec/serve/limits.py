"""Input limits: body size (by Content-Length and while streaming), image type by magic bytes.

The body limit is a pure ASGI middleware so it covers every route, including ones whose body
FastAPI parses itself, and it answers before the app reads a byte when Content-Length is too big.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imagerec.data.decode import sniff_format
from imagerec.serve.errors import ApiError, error_body

# The image types the decoder reads, by magic bytes (`imagerec.data.decode.sniff_format`, the one
# table every path uses); the client's filename and Content-Type are never trusted.
IMAGE_TYPES = ("jpeg", "png", "gif", "bmp", "tiff", "webp", "ppm")


def sniff_image_type(data: bytes) -> str | None:
    """'jpeg', 'png', 'gif', 'bmp', 'tiff', 'webp' or 'ppm' (PPM/PGM/PBM) from the leading bytes, else None."""
    fmt = sniff_format(data)
    return fmt.lower() if fmt else None


def size_text(n: int) -> str:
    """A byte count as bytes and, from 1 KiB, in the unit that fits: 10485 -> '10485 bytes (10.2 KiB)'
    (a fixed MiB showed small limits as "0.0 MiB", which reads as no body at all)."""
    if n < 1024:
        return f"{n} bytes"
    unit, scale = ("KiB", 1024) if n < 1024**2 else ("MiB", 1024**2) if n < 1024**3 else ("GiB", 1024**3)
    return f"{n} bytes ({n / scale:.1f} {unit})"


class BodyTooLarge(ApiError):
    """413 for a body over `limit` bytes: `seen` its declared length, or, with `streaming`, the bytes
    read when it passed the limit (a chunked body may have more to come)."""

    def __init__(self, limit: int, seen: int | None = None, streaming: bool = False) -> None:
        got = "" if seen is None else f" (at least {seen} bytes so far)" if streaming else f" ({seen} bytes)"
        super().__init__(
            413,
            "body_too_large",
            f"request body{got} exceeds the limit of {size_text(limit)}; send fewer or smaller images",
        )


class BodyLimitMiddleware:
    """Reject bodies over `limit` bytes: at once by Content-Length, else as soon as the stream passes it."""

    def __init__(
        self, app: ASGIApp, limit: int, on_error: Callable[[str], None] | None = None
    ) -> None:
        self.app, self.limit, self.on_error = app, limit, on_error

    def _note(self, type: str) -> None:
        if self.on_error is not None:
            self.on_error(type)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared == -1:
            self._note("bad_content_length")
            await _send_json(
                send,
                400,
                error_body(
                    "bad_content_length",
                    "Content-Length header is not a non-negative integer",
                ),
            )
            return
        if declared is not None and declared > self.limit:
            self._note("body_too_large")
            too_large = BodyTooLarge(self.limit, declared)
            await _send_json(
                send, 413, error_body(too_large.type, too_large.message), close=True
            )
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit, seen, streaming=True)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as e:
            if started:
                raise
            self._note(e.type)
            await _send_json(send, 413, error_body(e.type, e.message), close=True)


def _content_length(scope: Scope) -> int | None:
    """The declared length, None if absent, -1 if malformed (or given twice with different values)."""
    values = {v for k, v in scope.get("headers", ()) if k == b"content-length"}
    if not values:
        return None
    if len(values) > 1:
        return -1
    raw = values.pop().strip()
    return int(raw) if raw.isdigit() and len(raw) < 19 else -1


async def _send_json(
    send: Send, status: int, body: dict[str, Any], close: bool = False
) -> None:
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    if close:
        # The unread body makes the connection unusable for another request.
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
