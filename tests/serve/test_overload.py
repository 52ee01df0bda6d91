"""A tiny queue and a slow model: 503 + Retry-After at once, 504 on timeout, and the server recovers."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import start_thread_server

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
        t = time.perf_counter()
        r = httpx.post(
            slow_server.url + "/v1/predict",
            files={"file": ("x.png", digits[i], "image/png")},
            timeout=60,
        )
        return r.status_code, time.perf_counter() - t, dict(r.headers), r.json()

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    codes = [r[0] for r in results]
    assert set(codes) <= {200, 503}
    assert codes.count(200) >= 3 and codes.count(503) >= 3, codes
    for code, seconds, headers, body in results:
        if code == 503:
            assert headers["retry-after"] == "2"
            assert body["error"]["type"] in ("queue_full", "overloaded")
            assert seconds < 1.5, "a 503 must not wait for the queue"
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
