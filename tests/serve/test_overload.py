"""A tiny queue and a slow model: 503 + Retry-After at once, 504 on timeout, and the server recovers."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import metric_value, start_thread_server

import imagerec
from imagerec.serve import ServeSettings


def slow_loader(delay: float):
    def load(path: str):
        predictor = imagerec.load(path)
        fast = predictor.predict_batch

        def slow(x):
            time.sleep(delay)
            return fast(x)

        predictor.predict_batch = (
            slow  # instance attribute on our own object: the wrapper under test
        )
        return predictor

    return load


@pytest.fixture(scope="module")
def slow_server(run_dir):
    settings = ServeSettings(
        models=(str(run_dir),),
        loader=slow_loader(0.4),
        max_batch=1,
        max_wait_ms=0,
        queue_size=2,
        max_files=2,
        max_inflight=64,
        timeout_s=20,
        retry_after_s=2,
    )
    running = start_thread_server(settings)
    yield running
    running.stop()


def test_full_queue_answers_503_with_retry_after_at_once(slow_server, digits):
    def one(i: int) -> tuple[int, float, dict, dict]:
        r = httpx.post(
            slow_server.url + "/v1/predict",
            files={"file": ("x.png", digits[i], "image/png")},
            timeout=60,
        )
        return r.status_code, time.perf_counter(), dict(r.headers), r.json()  # when it was answered

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    codes = [r[0] for r in results]
    assert set(codes) <= {200, 503}
    assert codes.count(200) >= 3 and codes.count(503) >= 3, codes
    last_200 = max(done for code, done, _, _ in results if code == 200)
    for code, done, headers, body in results:
        if code == 503:
            assert headers["retry-after"] == "2"
            assert body["error"]["type"] in ("queue_full", "overloaded")
            # a 503 must not wait for the queue: the accepted ones take 3 x 0.4 s of model time one
            # after another, and every refusal is answered before the last of them (no clock limit,
            # which a busy machine would break)
            assert done < last_200, "a 503 waited for the queue"
    # ...and afterwards the server serves normally.
    r = httpx.post(
        slow_server.url + "/v1/predict",
        files={"file": ("x.png", digits[0], "image/png")},
        timeout=60,
    )
    assert r.status_code == 200
    assert httpx.get(slow_server.url + "/readyz").status_code == 200


def test_timeout_answers_504(run_dir, digits):
    settings = ServeSettings(
        models=(str(run_dir),),
        loader=slow_loader(1.0),
        max_batch=1,
        queue_size=16,
        timeout_s=0.3,
    )
    running = start_thread_server(settings)
    try:
        r = httpx.post(
            running.url + "/v1/predict",
            files={"file": ("x.png", digits[0], "image/png")},
            timeout=30,
        )
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        assert "0.3 s" in r.json()["error"]["message"]
        time.sleep(1.2)
        assert httpx.get(running.url + "/readyz").status_code == 200
    finally:
        running.stop()


def stalled_upload(url: str) -> socket.socket:
    """A connection that sends a prediction request's head and the first bytes of its body, then
    stalls (a slow-body attack, or a client on a very slow link)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=15)
    sock.sendall(
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
    )
    return sock


def test_stalled_uploads_take_upload_slots_not_prediction_capacity(run_dir, digits):
    settings = ServeSettings(
        models=(str(run_dir),), max_inflight=4, max_uploads=8, body_timeout_s=4
    )
    running = start_thread_server(settings)
    files = {"file": ("x.png", digits[0], "image/png")}
    stalled: list[socket.socket] = []
    try:
        with running.client() as c:
            stalled += [stalled_upload(running.url) for _ in range(6)]  # more than max_inflight
            time.sleep(0.5)  # every handler is now waiting for its body
            r = c.post("/v1/predict", files=files)
            assert r.status_code == 200, r.text
            text = c.get("/metrics").text
            assert metric_value(text, "imagerec_uploading_requests") == 6
            assert metric_value(text, "imagerec_inflight_requests") == 0

            stalled += [stalled_upload(running.url) for _ in range(2)]  # every upload slot taken
            time.sleep(0.5)
            r = c.post("/v1/predict", files=files)
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "too_many_uploads"
            assert "max_uploads=8" in r.json()["error"]["message"]

            for sock in stalled:  # each gets 408 once body_timeout_s has passed
                answer = sock.recv(65536)
                assert answer.startswith(b"HTTP/1.1 408 "), answer
                assert b"request_timeout" in answer and b"within 4 s" in answer
            assert c.post("/v1/predict", files=files).status_code == 200
            assert metric_value(c.get("/metrics").text, "imagerec_uploading_requests") == 0
    finally:
        for sock in stalled:
            sock.close()
        running.stop()
