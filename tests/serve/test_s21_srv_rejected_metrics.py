"""Session 21, serve QA bug 5: requests that the HTTP layer answers itself (400 bad_http_request for
what the parser rejects, 431 headers_too_large) are counted in /metrics like every other response."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from conftest import metric_value, start_thread_server

from imagerec.serve import http
from imagerec.serve.settings import ServeSettings

pytestmark = pytest.mark.skipif(http.HttpToolsProtocol is None, reason="httptools is not installed")


def send_raw(url: str, raw: bytes) -> bytes:
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(raw)
        return s.recv(300).split(b"\r\n")[0]


def test_requests_the_http_layer_rejects_are_counted(run_dir: Path) -> None:
    running = start_thread_server(ServeSettings(models=(str(run_dir),)))
    try:
        assert send_raw(running.url, b"GARBAGE\r\n\r\n") == b"HTTP/1.1 400 Bad Request"
        big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
        assert send_raw(running.url, big) == b"HTTP/1.1 431 Request Header Fields Too Large"
        text = httpx.get(running.url + "/metrics").text
    finally:
        running.stop()
    requests = "imagerec_requests_total"
    assert metric_value(text, requests, route="<unmatched>", method="OTHER", status="400") == 1
    assert metric_value(text, requests, route="<unmatched>", method="GET", status="431") == 1
    assert metric_value(text, "imagerec_errors_total", type="bad_http_request") == 1
    assert metric_value(text, "imagerec_errors_total", type="headers_too_large") == 1
