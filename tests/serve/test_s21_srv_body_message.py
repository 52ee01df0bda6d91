"""Session 21, serve QA bug 8: the 413 body_too_large message shows a small limit in a unit that fits
(not "0.0 MiB"), and a streamed body's message says how much had arrived."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from imagerec.serve.limits import BodyLimitMiddleware, BodyTooLarge, size_text


@pytest.mark.parametrize("n, text", [
    (500, "500 bytes"),
    (10485, "10485 bytes (10.2 KiB)"),
    (20 * 2**20, "20971520 bytes (20.0 MiB)"),
])
def test_sizes_are_shown_in_a_unit_that_fits(n: int, text: str) -> None:
    assert size_text(n) == text


def test_a_small_limit_is_not_shown_as_zero_mib() -> None:
    message = BodyTooLarge(10485, 35203).message
    assert message == ("request body (35203 bytes) exceeds the limit of 10485 bytes (10.2 KiB); "
                       "send fewer or smaller images")


async def read_all(scope, receive, send) -> None:
    """A bare ASGI app that reads the whole body, then answers its length."""
    n, more = 0, True
    while more:
        message = await receive()
        n, more = n + len(message.get("body", b"")), message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(n).encode()})


def test_a_streamed_body_says_how_much_had_arrived() -> None:
    def chunks():  # no Content-Length: chunked (the test client hands it over as one 20000-byte message)
        for _ in range(5):
            yield b"x" * 4000

    client = TestClient(BodyLimitMiddleware(read_all, limit=10485))  # no `with`: the bare app has no lifespan
    resp = client.post("/", content=chunks())
    assert resp.status_code == 413
    assert resp.json()["error"]["message"] == (
        "request body (at least 20000 bytes so far) exceeds the limit of 10485 bytes (10.2 KiB); "
        "send fewer or smaller images")
