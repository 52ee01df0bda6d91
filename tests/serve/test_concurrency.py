"""Concurrent clients, micro-batching, model versions, and switching the default under load."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import KEY, auth, metric_value, start_process_server, start_thread_server

import imagerec
from imagerec.serve import ServeSettings

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


@pytest.mark.parametrize("version", ["a/b", " ", "", "v 1", "-1", ".hidden", "x" * 33, "ü1", "1\n"])
def test_admin_load_refuses_a_version_the_cli_would_refuse(server, run_dir, version):
    """The same rule as NAME@VERSION=PATH: a version is a URL path segment, so 'a/b' would load
    and then be unreachable at /v1/models/{name}/versions/{version}."""
    with server.client(headers=auth()) as c:
        before = c.get("/v1/models").json()["models"]
        r = c.post("/v1/admin/models", json={"path": run_dir.name, "name": "checked", "version": version})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_version"
        assert f"model version '{version}' must match" in err["message"]
        assert c.get("/v1/models").json()["models"] == before


def test_reload_is_all_or_nothing_and_rereads_the_keys_whatever_the_models_do(run_dir, digits, tmp_path):
    """Two versions, the second one's checkpoint broken after startup: the reload answers 422
    naming it, swaps neither (the first is not half-reloaded), and still re-reads the key file."""
    import shutil

    good, bad = tmp_path / "good", tmp_path / "bad"
    shutil.copytree(run_dir, good)
    shutil.copytree(run_dir, bad)
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{KEY}\n")
    running = start_thread_server(
        ServeSettings(models=(f"good@1={good}", f"bad@1={bad}"), api_key_file=str(keys))
    )
    files = {"file": ("x.png", digits[0], "image/png")}

    def loaded_at(c: httpx.Client) -> dict[str, str]:
        return {f"{m['name']}@{m['version']}": m["loaded_at"] for m in c.get("/v1/models").json()["models"]}

    try:
        with running.client(headers=auth()) as c:
            before = loaded_at(c)
            time.sleep(1.1)  # loaded_at has 1 s resolution: a version swapped in now shows a new one
            for f in bad.glob("*.safetensors"):
                f.write_bytes(b"not a checkpoint")
            rotated = "rotated-key-0123456789abcdef"
            keys.write_text(f"{KEY}\n{rotated}\n")
            r = c.post("/v1/admin/reload", json={})
            assert r.status_code == 422, r.text
            assert loaded_at(c) == before  # good@1 was not swapped either
            err = r.json()["error"]
            assert err["type"] == "model_load_failed" and "bad@1 cannot be loaded" in err["message"]
            assert err["reloaded"] == [] and err["api_keys"] == 2
            for path in ("/v1/models/good/versions/1/predict", "/v1/models/bad/versions/1/predict"):
                assert c.post(path, files=files).status_code == 200  # the old versions serve on
            with running.client() as fresh:  # the rotated key is in force
                assert fresh.post("/v1/predict", files=files, headers={"X-API-Key": rotated}).status_code == 200

            for f in run_dir.glob("*.safetensors"):  # repaired: now everything reloads
                shutil.copy(f, bad / f.name)
            r = c.post("/v1/admin/reload", json={})
            assert r.status_code == 200, r.text
            assert r.json()["reloaded"] == [{"name": "good", "version": "1"}, {"name": "bad", "version": "1"}]
            assert all(loaded_at(c)[k] != before[k] for k in before)
    finally:
        running.stop()
