"""The HTTP/1.1 protocol the server runs: uvicorn's httptools (C, llhttp) parser with a cap on the
request head, or uvicorn's pure-Python h11 when httptools is not installed.

httptools parses a request in a fraction of h11's time, but it has no limit on the size of the
request line and headers: it buffers a header of any length. h11 has one
(`h11_max_incomplete_event_size`). `CappedHttpToolsProtocol` adds the same cap: once more than
`MAX_HEAD_BYTES` arrive before the head ends (or a head that ends in a read is longer than
that), the client gets a 431 JSON error and the connection is closed, before the parser buffers
any of it, so memory per connection stays bounded whichever parser runs. A request the parser
rejects (garbage, a bad method, a broken chunked body) gets the app's JSON error shape too, not
uvicorn's plain-text "Invalid HTTP request received.", with either parser (`JsonH11Protocol` for h11).
Both are counted in the app's /metrics (`count_rejected`), as every response the app itself gives is.
"""

from __future__ import annotations

import json
from typing import Any

from imagerec.serve.errors import error_body
from imagerec.serve.metrics import ServeMetrics, count_rejected

MAX_HEAD_BYTES = 64 * 1024

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools missing: uvicorn's h11 protocol, capped by h11_max_incomplete_event_size
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


def _json_close_response(status_line: bytes, type: str, message: str) -> bytes:
    body = json.dumps(error_body(type, message)).encode()
    return (status_line + b"\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


def _head_too_large_response(limit: int) -> bytes:
    return _json_close_response(
        b"HTTP/1.1 431 Request Header Fields Too Large", "headers_too_large",
        f"the request line and headers exceed {limit} bytes ({limit // 1024} KiB); send fewer or shorter headers")


def _bad_request_response(msg: str) -> bytes:
    return _json_close_response(
        b"HTTP/1.1 400 Bad Request", "bad_http_request",
        f"the request is not valid HTTP/1.1 ({msg.rstrip('.')}); send a well-formed request, e.g. "
        "POST /v1/predict with a multipart/form-data body")


def app_metrics(app: Any) -> ServeMetrics | None:
    """The ServeMetrics of the app uvicorn runs (app.state.metrics, see create_app), under the
    wrappers uvicorn may put around it (each holds the next as `.app`); None for another app."""
    for _ in range(8):
        metrics = getattr(getattr(app, "state", None), "metrics", None)
        if isinstance(metrics, ServeMetrics):
            return metrics
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


def _method(head: bytes) -> str:
    """The method of a request line (for the metrics label; count_rejected maps unknown ones to OTHER)."""
    return head.split(b" ", 1)[0][:8].decode("ascii", "replace").upper()


class _JsonRejects:
    """What both protocols do with a request their parser rejects: the app's JSON error shape instead
    of uvicorn's plain-text "Invalid HTTP request received.", counted in /metrics. Mixed into a uvicorn
    protocol class (it has `app`, `cycle` and `transport`)."""

    app: Any
    cycle: Any
    transport: Any
    head_limit = MAX_HEAD_BYTES

    def _setup_rejects(self) -> None:
        self._head_bytes, self._tail = 0, b""
        self._metrics = app_metrics(self.app)
        self._start = b""  # the first bytes of the request head now arriving (its method)

    def _head_rejected(self, data: bytes, in_head: bool) -> bool:
        """Answer 431 and close when `data` takes the request head now arriving over the limit (before
        the parser sees, and buffers, any of it); True when it did."""
        if not in_head:
            return False
        if self._head_bytes == 0 and not self._tail:
            self._start = data[:16]
        if not self._head_over_limit(data):
            return False
        self._reject(431, "headers_too_large", _head_too_large_response(self.head_limit))
        return True

    def _head_over_limit(self, data: bytes) -> bool:
        """Whether the head now arriving is over the limit, measured to its end (a blank line)
        when it ends in `data`, else counting all of `data`; a head split over reads is summed."""
        window = self._tail + data  # the blank line may straddle two reads
        ends = [i for i in (window.find(b"\r\n\r\n"), window.find(b"\n\n")) if i >= 0]
        if ends:
            size = self._head_bytes - len(self._tail) + min(ends) + 2
            self._head_bytes, self._tail = 0, b""
            return size > self.head_limit
        self._head_bytes += len(data)
        self._tail = window[-3:]
        return self._head_bytes > self.head_limit

    def _reject(self, status: int, type: str, response: bytes) -> None:
        """Answer `response` and close. A 400 (the parser failed in a body the app is reading, e.g. a
        broken chunked encoding) is answered even then, counted only when the app has no request (it
        counts its own); a 431 while a response is being sent just closes (no interleaved bytes)."""
        idle = self._idle()
        if idle and self._metrics is not None:
            count_rejected(self._metrics, _method(self._start), status, type)
        if idle or status == 400:
            self.transport.write(response)
        self.transport.close()

    def _idle(self) -> bool:
        """No request of this connection is with the app (none yet, or its response is sent)."""
        return self.cycle is None or self.cycle.response_complete


try:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError:  # h11 missing: uvicorn needs it, so only a broken install gets here
    H11Protocol = None  # type: ignore[assignment,misc]


if H11Protocol is not None:

    class JsonH11Protocol(_JsonRejects, H11Protocol):  # type: ignore[misc,valid-type]
        """uvicorn's h11 protocol (`serve --http h11`, or no httptools) with the JSON rejects and the
        same head cap as httptools: h11's own (`h11_max_incomplete_event_size`) only bounds a head
        still arriving, and took a 70 KB head sent in one piece."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._setup_rejects()

        def data_received(self, data: bytes) -> None:
            # their_state IDLE: the client has not sent a whole request head yet
            if not self._head_rejected(data, self.conn.their_state is h11.IDLE):
                super().data_received(data)

        def send_400_response(self, msg: str) -> None:  # uvicorn's hook for requests h11 rejects
            if len(self.conn.trailing_data[0]) > self.head_limit:
                self._reject(431, "headers_too_large", _head_too_large_response(self.head_limit))
            else:
                self._reject(400, "bad_http_request", _bad_request_response(msg))


if HttpToolsProtocol is not None:

    class CappedHttpToolsProtocol(_JsonRejects, HttpToolsProtocol):  # type: ignore[misc,valid-type]
        """uvicorn's httptools protocol; a request head over `head_limit` bytes gets 431 and a close."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_head = True
            self._setup_rejects()

        def data_received(self, data: bytes) -> None:
            if not self._head_rejected(data, self._in_head):
                super().data_received(data)

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head, self._head_bytes, self._tail = True, 0, b""  # the next request on this connection

        def send_400_response(self, msg: str) -> None:  # uvicorn's hook for requests its parser rejects
            self._reject(400, "bad_http_request", _bad_request_response(msg))


def http_protocol(parser: str = "auto") -> Any:
    """What to pass as uvicorn.Config(http=...) for `serve --http PARSER`: "auto", the capped httptools
    protocol where httptools is installed, else h11; "h11", h11. Both answer rejects in JSON."""
    if parser == "auto" and HttpToolsProtocol is not None:
        return CappedHttpToolsProtocol
    return JsonH11Protocol if H11Protocol is not None else "h11"
