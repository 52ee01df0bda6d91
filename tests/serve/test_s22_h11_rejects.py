"""`serve --http h11` (and any install without httptools) answers what its parser rejects as the
httptools path does: the app's JSON error shape (400 bad_http_request, 431 headers_too_large for a
head over the cap), counted in /metrics. Before, h11's rejects were uvicorn's plain-text 400
"Invalid HTTP request received." for both, and /metrics never saw them."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from urllib.parse import urlparse

import httpx
from conftest import metric_value, start_thread_server

from imagerec.serve.settings import ServeSettings


def send_raw(url: str, raw: bytes) -> tuple[bytes, dict]:
    """The status line and the JSON body of the server's answer to `raw`; the server closes."""
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower()
    return head.split(b"\r\n")[0], json.loads(body)


def test_h11_rejects_are_json_and_counted(run_dir: Path) -> None:
    running = start_thread_server(ServeSettings(models=(str(run_dir),), http="h11"))
    try:
        status, body = send_raw(running.url, b"GARBAGE\r\n\r\n")
        assert status == b"HTTP/1.1 400 Bad Request"
        assert body["error"]["type"] == "bad_http_request" and "not valid HTTP/1.1" in body["error"]["message"]
        big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
        status, body = send_raw(running.url, big)
        assert status == b"HTTP/1.1 431 Request Header Fields Too Large"
        assert body["error"]["type"] == "headers_too_large"
        assert httpx.get(running.url + "/healthz").status_code == 200  # still serving
        text = httpx.get(running.url + "/metrics").text
    finally:
        running.stop()
    assert metric_value(text, "imagerec_requests_total", route="<unmatched>", method="OTHER", status="400") == 1
    assert metric_value(text, "imagerec_requests_total", route="<unmatched>", method="GET", status="431") == 1
    assert metric_value(text, "imagerec_errors_total", type="bad_http_request") == 1
    assert metric_value(text, "imagerec_errors_total", type="headers_too_large") == 1
