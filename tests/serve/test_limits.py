"""Every limit and every kind of bad input -> the right 4xx with a JSON error naming the problem."""

from __future__ import annotations

import io
import json
import logging
import socket
import struct
import time
import zlib

import pytest
from conftest import KEY, auth, metric_value
from PIL import Image


def png_header_only(
    width: int, height: int, bit_depth: int = 1, color_type: int = 0, rows: int = 0
) -> bytes:
    """A PNG that declares width x height; with `rows`, holds that many real (zero) rows."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    row = b"\x00" + b"\x00" * ((width * bit_depth + 7) // 8)
    idat = zlib.compress(row * rows, 9) if rows else zlib.compress(b"")
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """A real 20000x20000 1-bit PNG (400 M pixels, about 50 KB compressed)."""
    return png_header_only(20000, 20000, rows=20000)


def post(server, **kwargs):
    with server.client(headers=auth()) as c:
        return c.post("/v1/predict", **kwargs)


def expect(resp, status: int, type: str, *in_message: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert err["type"] == type, err
    for text in in_message:
        assert text in err["message"], err["message"]


def test_body_too_large_by_content_length(server):
    expect(
        post(
            server,
            files={
                "file": (
                    "big.png",
                    b"\x89PNG\r\n\x1a\n" + b"\0" * (3 * 2**20),
                    "image/png",
                )
            },
        ),
        413,
        "body_too_large",
        "exceeds",
    )


def test_body_too_large_while_streaming(server):
    def chunks():  # no Content-Length: chunked transfer encoding
        for _ in range(40):
            yield b"x" * 100_000

    expect(
        post(
            server,
            content=chunks(),
            headers={"Content-Type": "application/json", **auth()},
        ),
        413,
        "body_too_large",
    )


def test_too_many_files(server, digits):
    files = [("file", (f"d{i}.png", digits[i], "image/png")) for i in range(9)]
    expect(post(server, files=files), 413, "too_many_files", "limit is 8")
    data = {"images": ["iVBORw0KGgo="] * 9}
    expect(post(server, json=data), 413, "too_many_files")


def test_decompression_bomb(server, bomb_png):
    expect(
        post(server, files={"file": ("bomb.png", bomb_png, "image/png")}),
        413,
        "too_many_pixels",
        "image 0 ('bomb.png')",
        "decompression bomb",
    )


def test_image_over_server_pixel_limit(server):
    # 3000 x 3000 = 9 M pixels: under PIL's own limit, over this server's 4 M.
    expect(
        post(
            server,
            files={"file": ("big.png", png_header_only(3000, 3000), "image/png")},
        ),
        413,
        "too_many_pixels",
        "3000x3000",
    )


def test_text_posing_as_png(server):
    expect(
        post(
            server,
            files={
                "file": (
                    "cat.png",
                    b"<html><script>alert(1)</script></html>",
                    "image/png",
                )
            },
        ),
        415,
        "unsupported_media_type",
        "cat.png",
    )


def test_an_unread_format_is_refused_with_the_advice_to_convert_it(server):
    """The same words as predict's: a TGA (no magic bytes) gets a 415 that says to convert the file."""
    tga = bytes([0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 2, 0, 24, 0]) + b"\xff" * 12
    expect(post(server, files={"file": ("b3.tga", tga, "image/x-tga")}), 415, "unsupported_media_type",
           "convert the file (e.g. to PNG)")


def test_png_header_plus_html_polyglot(server):
    body = b"\x89PNG\r\n\x1a\n<html><body>hello</body></html>" * 3
    expect(
        post(server, files={"file": ("poly.png", body, "image/png")}),
        422,
        "undecodable_image",
        "image 0 ('poly.png')",
    )


def test_truncated_image_names_index_and_file(server, digits):
    files = [
        ("file", ("ok.png", digits[0], "image/png")),
        ("file", ("cut.png", digits[1][: len(digits[1]) // 2], "image/png")),
    ]
    expect(post(server, files=files), 422, "undecodable_image", "image 1 ('cut.png')")


def test_empty_body_and_empty_file(server):
    expect(
        post(
            server, content=b"", headers={"Content-Type": "application/json", **auth()}
        ),
        400,
        "empty_body",
    )
    expect(
        post(server, files={"file": ("empty.png", b"", "image/png")}),
        400,
        "empty_file",
        "empty.png",
    )


def test_bad_base64_and_bad_json(server, digits):
    import base64

    good = base64.b64encode(digits[0]).decode()
    expect(
        post(server, json={"images": [good, "not base64 !!"]}),
        400,
        "bad_base64",
        "image 1",
    )
    expect(
        post(
            server,
            content=b"{not json",
            headers={"Content-Type": "application/json", **auth()},
        ),
        400,
        "invalid_json",
    )
    expect(post(server, json={"images": "abc"}), 400, "invalid_json", "list of base64")
    expect(post(server, json={"pictures": [good]}), 400, "invalid_json")
    # A data: URL prefix and URL-safe base64 are both accepted.
    assert (
        post(server, json={"images": ["data:image/png;base64," + good]}).status_code
        == 200
    )


def test_wrong_content_type(server, digits):
    expect(
        post(
            server, content=digits[0], headers={"Content-Type": "text/plain", **auth()}
        ),
        415,
        "unsupported_content_type",
        "text/plain",
    )
    expect(
        post(server, content=digits[0], headers=auth()), 415, "unsupported_content_type"
    )


def test_content_type_comes_from_bytes_not_the_client(server, digits):
    # A real PNG sent as "text/plain" named "x.txt" is still a PNG.
    r = post(server, files={"file": ("x.txt", digits[0], "text/plain")})
    assert r.status_code == 200 and r.json()["predictions"][0]["format"] == "png"


def test_every_signature_is_accepted(server):
    img = Image.new("L", (40, 30), 128)
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        r = post(
            server,
            files={
                "file": (f"x.{fmt.lower()}", buf.getvalue(), "application/octet-stream")
            },
        )
        assert r.status_code == 200, (fmt, r.text)
        assert r.json()["predictions"][0]["format"] == fmt.lower().replace(
            "jpeg", "jpeg"
        )


def test_bad_multipart(server):
    h = {"Content-Type": "multipart/form-data", **auth()}
    expect(
        post(server, content=b"--x\r\n", headers=h), 400, "bad_multipart", "boundary"
    )
    h = {"Content-Type": "multipart/form-data; boundary=abc", **auth()}
    expect(
        post(server, content=b"garbage without any boundary", headers=h),
        400,
        "bad_multipart",
        "malformed",
    )
    body = b'--abc\r\nContent-Disposition: form-data; name="other"\r\n\r\nvalue\r\n--abc--\r\n'
    expect(post(server, content=body, headers=h), 400, "no_images", "'file'")


def test_bad_parameters(server, digits):
    files = {"file": ("x.png", digits[0], "image/png")}
    expect(
        post(server, files=files, params={"top_k": 0}),
        422,
        "invalid_parameter",
        "top_k",
    )
    expect(
        post(server, files=files, params={"top_k": 10_000}),
        422,
        "invalid_parameter",
        "top_k",
    )
    expect(post(server, files=files, params={"top_k": "x"}), 422, "invalid_parameter")
    r = post(
        server, files=files, params={"top_k": 50}
    )  # clamped to the number of classes
    assert r.status_code == 200 and len(r.json()["predictions"][0]["topk"]) == 10


def test_unknown_routes_and_methods(server):
    with server.client() as c:
        expect(c.get("/v1/nothing"), 404, "not_found")
        expect(c.get("/v1/predict"), 405, "method_not_allowed")


def test_client_gone_mid_body_is_not_a_server_error(server, caplog):
    """A client that sends headers and part of its body, then hangs up (wrk stopping at its
    deadline does this), is counted as client_disconnected: no 500, no "internal error" log."""
    def errors(type: str) -> float:
        with server.client() as c:
            return metric_value(c.get("/metrics").text, "imagerec_errors_total", type=type)

    internal, gone = errors("internal_error"), errors("client_disconnected")
    host, port = server.url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
    )
    with caplog.at_level(logging.INFO, logger="imagerec.serve"):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head.encode() + b"--b\r\nContent-Disposition: form-data; name=file\r\n\r\n\x89PNG")
            time.sleep(0.3)  # the handler is now waiting for the rest of the body
        deadline = time.monotonic() + 10
        while errors("client_disconnected") == gone and time.monotonic() < deadline:
            time.sleep(0.1)
    assert errors("client_disconnected") == gone + 1
    assert errors("internal_error") == internal
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]
    with server.client() as c:  # still serving
        assert c.get("/healthz").status_code == 200


def _raw_exchange(server, requests: list[bytes], chunk: int = 8192) -> bytes:
    """Send raw HTTP requests on one connection, in small chunks, and read until the server closes
    or has answered each; a server that hangs up mid-send is fine (its answer is still read)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        try:
            for req in requests:
                for i in range(0, len(req), chunk):
                    sock.sendall(req[i:i + chunk])
        except OSError:
            pass
        received = b""
        try:
            while received.count(b"HTTP/1.1 ") < len(requests):
                data = sock.recv(65536)
                if not data:
                    break
                received += data
        except OSError:
            pass
    return received


def _closing_json_error(server, answer: bytes, status: int, type: str) -> str:
    """The message of a JSON error answered with `status` and a close; the server still serves."""
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower() and b"content-type: application/json" in head.lower()
    err = json.loads(body)["error"]
    assert err["type"] == type
    with server.client() as c:
        assert c.get("/healthz").status_code == 200
    return err["message"]


def _get(header_bytes: int) -> bytes:
    return (f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {'A' * header_bytes}\r\n\r\n").encode()


@pytest.mark.parametrize("size", [70_000, 200_000])
@pytest.mark.parametrize("chunk", [8192, 2**20])  # trickled, or written at once (often one read)
def test_oversized_request_head_gets_431_and_a_close(server, size, chunk):
    """httptools buffers a header of any size; the server caps the request line + headers at 64 KiB."""
    message = _closing_json_error(server, _raw_exchange(server, [_get(size)], chunk), 431, "headers_too_large")
    assert "65536 bytes" in message


@pytest.mark.parametrize("chunk", [8192, 2**20])
def test_head_limit_is_per_request_on_a_kept_alive_connection(server, chunk):
    """Three 60 KB heads on one connection (180 KB in all) are three good requests."""
    answer = _raw_exchange(server, [_get(60_000)] * 3, chunk)
    assert answer.count(b"HTTP/1.1 200 ") == 3, answer[:300]


def test_early_413_is_counted_under_its_route(server, digits):
    """A 413 by Content-Length is answered before routing; it must count under the route its path
    names, like the same request streamed, not under "<unmatched>"."""
    predict, versioned = "/v1/predict", "/v1/models/{name}/versions/{version}/predict"

    def counts() -> tuple[float, ...]:
        with server.client() as c:
            text = c.get("/metrics").text
        return tuple(
            metric_value(text, "imagerec_requests_total", route=route, status="413")
            for route in (predict, versioned, "<unmatched>")
        )

    def chunks():
        for _ in range(40):
            yield b"x" * 100_000

    big = {"file": ("big.png", digits[0] + b"\0" * 3 * 2**20, "image/png")}
    before = counts()
    with server.client(headers=auth()) as c:
        assert c.post("/v1/predict", files=big).status_code == 413  # by Content-Length
        assert c.post("/v1/predict", content=chunks(), headers={"Content-Type": "application/json"}).status_code == 413
        assert c.post("/v1/models/mnist/versions/1/predict", files=big).status_code == 413
        assert c.post("/v1/models/nope/versions/9/predict", files=big).status_code == 413  # not loaded: same template
        assert c.post("/no/such/route", files=big).status_code == 413
    after = counts()
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 2, 1]


def test_multipart_cut_before_its_closing_boundary(server, digits):
    h = {"Content-Type": "multipart/form-data; boundary=abc", **auth()}
    part = b'--abc\r\nContent-Disposition: form-data; name="file"; filename="d.png"\r\nContent-Type: image/png\r\n\r\n'
    whole = part + digits[0] + b"\r\n--abc--\r\n"
    assert post(server, content=whole, headers=h).status_code == 200
    for cut in (part + digits[0], part + digits[0] + b"\r\n--abc", part[:40]):
        expect(post(server, content=cut, headers=h), 400, "bad_multipart",
               "the body ends before the closing boundary '--abc--'")


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_unreadable_image_header_names_the_upload_and_type(server, digits, kind):
    """A real digit whose header is damaged after its magic bytes: the message names the upload and
    the type read from those bytes, and no Python object (PIL's own says "<_io.BytesIO object at
    0x7f...>")."""
    image = Image.open(io.BytesIO(digits[3]))
    buf = io.BytesIO()
    image.save(buf, format=kind.upper())
    data = buf.getvalue()
    if kind == "png":  # the first chunk's length and type (IHDR) zeroed
        damaged = data[:8] + b"\0" * 8 + data[16:]
    else:  # everything after the start-of-image marker reversed
        damaged = data[:3] + bytes(reversed(data[3:]))
    r = post(server, files={"file": ("seven.img", damaged, "application/octet-stream")})
    expect(r, 422, "undecodable_image", "image 0 ('seven.img')", kind.upper(), "header cannot be read")
    assert "BytesIO" not in r.text and " 0x" not in r.text


@pytest.mark.parametrize("raw", [b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
                                 b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"])
def test_requests_the_parser_rejects_get_a_json_400(server, raw):
    assert "not valid HTTP/1.1" in _closing_json_error(server, _raw_exchange(server, [raw]), 400, "bad_http_request")
