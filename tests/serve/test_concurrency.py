"""Concurrent clients, micro-batching, model versions, and switching the default under load."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from conftest import auth, metric_value, start_process_server

import imagerec

N_CLIENTS = 32


def test_32_concurrent_clients_get_the_predictors_answers_in_batches(
    server, run_dir, digits
):
    expected = imagerec.load(str(run_dir)).predict(digits, top_k=3)
    with server.client() as c:
        before = c.get("/metrics").text
    start = threading.Barrier(N_CLIENTS)

    def client(worker: int) -> list[tuple[int, dict]]:
        out = []
        with httpx.Client(base_url=server.url, headers=auth(), timeout=30) as c:
            start.wait()
            for i in range(
                worker, len(digits), N_CLIENTS
            ):  # about 6 requests per client
                r = c.post(
                    "/v1/predict",
                    params={"top_k": 3},
                    files={"file": (f"{i}.png", digits[i], "image/png")},
                )
                assert r.status_code == 200, r.text
                out.append((i, r.json()["predictions"][0]))
        return out

    with ThreadPoolExecutor(N_CLIENTS) as pool:
        results = [item for part in pool.map(client, range(N_CLIENTS)) for item in part]
    assert len(results) == len(digits)
    for i, got in results:
        want = expected[i]
        assert got["label"] == want["label"], i
        assert [t["label"] for t in got["topk"]] == [t["label"] for t in want["topk"]]
        assert abs(got["score"] - want["score"]) < 1e-5

    with server.client() as c:
        after = c.get("/metrics").text
    images = metric_value(
        after, "imagerec_batch_size_sum", model="mnist@1"
    ) - metric_value(before, "imagerec_batch_size_sum", model="mnist@1")
    batches = metric_value(
        after, "imagerec_batch_size_count", model="mnist@1"
    ) - metric_value(before, "imagerec_batch_size_count", model="mnist@1")
    singles = metric_value(
        after, "imagerec_batch_size_bucket", model="mnist@1", le="1.0"
    ) - metric_value(before, "imagerec_batch_size_bucket", model="mnist@1", le="1.0")
    assert images == len(digits)
    assert batches < images, "no batch held more than one image"
    assert batches - singles >= 1  # at least one batch of size > 1
    print(
        f"\n{int(images)} images in {int(batches)} batches (mean {images / batches:.1f})"
    )


def test_two_instances_answer_concurrent_clients_like_the_predictor(run_dir, digits):
    """serve --instances 2: two model copies of one thread each share the queue (in a subprocess:
    the instances set PyTorch's thread count for their whole process)."""
    expected = imagerec.load(str(run_dir)).predict(digits[:64])
    srv = start_process_server([str(run_dir), "--instances=2", "--max_wait_ms=2"])
    try:
        with srv.client() as c:
            card = c.get("/v1/models").json()["models"][0]
        assert card["instances"] == 2

        def client(i: int) -> tuple[int, dict]:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                r = c.post("/v1/predict", files={"file": (f"{i}.png", digits[i], "image/png")})
                assert r.status_code == 200, r.text
                return i, r.json()["predictions"][0]

        with ThreadPoolExecutor(N_CLIENTS) as pool:
            results = list(pool.map(client, range(64)))
        for i, got in results:
            assert got["label"] == expected[i]["label"], i
            assert abs(got["score"] - expected[i]["score"]) < 1e-5
        with srv.client() as c:
            text = c.get("/metrics").text
        assert metric_value(text, "imagerec_batch_size_sum", model="mnist@1") == 64
    finally:
        srv.stop()


def test_switching_default_under_load_fails_no_request(server, digits):
    stop = threading.Event()
    failures: list[str] = []
    versions: dict[str, int] = {}
    lock = threading.Lock()

    def hammer(worker: int) -> int:
        n = 0
        with httpx.Client(base_url=server.url, headers=auth(), timeout=30) as c:
            while not stop.is_set():
                r = c.post(
                    "/v1/predict",
                    files={
                        "file": (
                            "x.png",
                            digits[(worker + n) % len(digits)],
                            "image/png",
                        )
                    },
                )
                n += 1
                with lock:
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                    else:
                        v = r.json()["version"]
                        versions[v] = versions.get(v, 0) + 1
        return n

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(hammer, w) for w in range(16)]
        with httpx.Client(base_url=server.url, headers=auth(), timeout=30) as admin:
            for k in range(12):
                time.sleep(0.15)
                r = admin.post(
                    "/v1/admin/default",
                    json={"name": "mnist", "version": "2" if k % 2 == 0 else "1"},
                )
                assert r.status_code == 200, r.text
            # A reload swaps in fresh predictors + batchers while requests are running.
            r = admin.post("/v1/admin/reload", json={"name": "mnist", "version": "1"})
            assert r.status_code == 200 and r.json()["reloaded"] == [
                {"name": "mnist", "version": "1"}
            ]
            time.sleep(0.3)
        stop.set()
        total = sum(f.result() for f in futures)
    assert failures == []
    assert set(versions) == {"1", "2"}, versions
    assert total > 50
    with server.client() as c:
        assert c.get("/readyz").json()["default"] == {"name": "mnist", "version": "1"}


def test_admin_loads_a_version_only_from_model_dirs(server, run_dir, digits):
    with server.client(headers=auth()) as c:
        r = c.post(
            "/v1/admin/models",
            json={"path": run_dir.name, "name": "digits", "version": "7"},
        )
        assert r.status_code == 201, r.text
        assert (
            r.json()["name"] == "digits"
            and r.json()["version"] == "7"
            and r.json()["default"] is False
        )
        assert (
            c.post(
                "/v1/models/digits/versions/7/predict",
                files={"file": ("x.png", digits[0], "image/png")},
            ).status_code
            == 200
        )
        dup = c.post(
            "/v1/admin/models",
            json={"path": str(run_dir), "name": "digits", "version": "7"},
        )
        assert dup.status_code == 409
        outside = c.post("/v1/admin/models", json={"path": "/etc"})
        assert (
            outside.status_code == 403
            and outside.json()["error"]["type"] == "path_not_allowed"
        )
        escape = c.post("/v1/admin/models", json={"path": "../../../../etc"})
        assert escape.status_code == 403
        url = c.post("/v1/admin/models", json={"path": "https://example.com/model"})
        assert (
            url.status_code == 400 and "never fetched" in url.json()["error"]["message"]
        )
        missing = c.post("/v1/admin/models", json={"path": "no-such-run"})
        assert missing.status_code == 404
        broken = c.post(
            "/v1/admin/models", json={"path": str(run_dir.parent)}
        )  # a folder that is not a run
        assert (
            broken.status_code == 422
            and broken.json()["error"]["type"] == "model_load_failed"
        )
        extra = c.post("/v1/admin/models", json={"path": run_dir.name, "evil": 1})
        assert extra.status_code == 422
        unknown = c.post("/v1/admin/default", json={"name": "digits", "version": "8"})
        assert unknown.status_code == 404
        names = {
            (m["name"], m["version"]) for m in c.get("/v1/models").json()["models"]
        }
        assert ("digits", "7") in names
