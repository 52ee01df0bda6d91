"""QA pass 6 (serve-admin): reloads and unloads never fail a running request, admin paths in every
model dir, the --db store (opened again after a failure at startup, each row's own time, the run it
came from, a bounded shutdown), a JSON answer to a refused CORS preflight."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from conftest import auth, metric_value, start_thread_server
from test_workers import kill_one_worker, readiness, start_workers_serving_a_removed_version, stop_workers

from imagerec.serve import ServeSettings
from imagerec.serve.metrics import ServeMetrics
from imagerec.serve.registry import ModelRegistry
from imagerec.serve.workers import Admin, AdminLog, ReplayError
from imagerec.utils import ImageRecError

pytestmark = pytest.mark.timeout(300)


# --- helpers ----------------------------------------------------------------------------------------
class SlowUpload:
    """A multipart upload whose body arrives in two parts: the request has picked its model version
    and is reading its body between `__init__` and `finish`."""

    def __init__(self, url: str, path: str, image: bytes) -> None:
        host, port = url.removeprefix("http://").split(":")
        body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="d.png"\r\n'
                b"Content-Type: image/png\r\n\r\n" + image + b"\r\n--b--\r\n")
        self.rest = body[50:]
        self.sock = socket.create_connection((host, int(port)))
        self.sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Authorization: {auth()['Authorization']}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body[:50]
        )
        deadline = time.monotonic() + 10  # the server is reading this body now
        while metric_value(httpx.get(url + "/metrics").text, "imagerec_uploading_requests") < 1:
            assert time.monotonic() < deadline, "the server never began reading the upload"
            time.sleep(0.02)

    def finish(self) -> tuple[int, dict[str, Any]]:
        self.sock.sendall(self.rest)
        self.sock.settimeout(30)
        data = b""
        while chunk := self.sock.recv(65536):
            data += chunk
        self.sock.close()
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(body)


def predict(c: httpx.Client, image: bytes, path: str = "/v1/predict") -> httpx.Response:
    return c.post(path, headers=auth(), files={"file": ("d.png", image, "image/png")})


# --- bug 1: a reload lets a request still uploading finish on its model ------------------------------
def test_a_reload_never_fails_a_request_whose_body_is_still_arriving(run_dir, key_file, digits):
    """QA: with --timeout-s 3, an upload taking 8 s got 503 model_unloading when a reload came 1 s
    into it: the retired batcher was stopped timeout_s + 1 s after the swap, while the request, which
    picked its model before reading its body, may take body_timeout_s more. It now holds the version
    until it is answered."""
    running = start_thread_server(ServeSettings(models=(f"mnist@1={run_dir}",), api_key_file=str(key_file),
                                                timeout_s=2.0))  # decode + inference: ample on a busy machine
    try:
        slow = SlowUpload(running.url, "/v1/predict", digits[0])
        with running.client() as c:
            r = c.post("/v1/admin/reload", headers=auth(), json={})
            assert r.status_code == 200 and r.json()["reloaded"] == [{"name": "mnist", "version": "1"}], r.text
            time.sleep(3.5)  # past the old retirement (timeout_s + 1 s after the swap)
            status, body = slow.finish()
            assert status == 200, body
            assert body["model"] == "mnist" and body["predictions"][0]["sha256"]
            assert predict(c, digits[1]).status_code == 200  # and the new version serves
    finally:
        running.stop()


def test_a_retired_version_stops_once_the_last_request_holding_it_is_done(run_dir):
    registry = ModelRegistry(ServeSettings(models=(f"m@1={run_dir}",), timeout_s=0.1), ServeMetrics())
    registry.load_startup()
    try:
        with registry.holding(registry.default) as old:
            registry.reload()
            assert registry.default() is not old
            time.sleep(1.5)  # past timeout_s + 1 s: the old rule had stopped it by now
            assert old.batcher.alive  # still held
        deadline = time.monotonic() + 10
        while old.batcher.instances and time.monotonic() < deadline:  # emptied once its threads have ended
            time.sleep(0.02)
        assert not old.batcher.alive and old.batcher.instances == []  # stopped and released
    finally:
        registry.stop_all()


# --- bug 2: a relative admin path is looked for in every model dir --------------------------------------
def test_admin_load_finds_a_relative_path_in_any_model_dir(run_dir, key_file, tmp_path):
    other = tmp_path / "other"
    for name in ("b", "b2"):
        shutil.copytree(run_dir, other / name)
    running = start_thread_server(ServeSettings(models=(f"mnist@1={run_dir}", f"other@1={other / 'b'}"),
                                                api_key_file=str(key_file)))
    try:
        with running.client() as c:
            r = c.post("/v1/admin/models", headers=auth(), json={"path": "b2", "name": "other", "version": "2"})
            assert r.status_code == 201, r.text  # in the second dir: the first has no b2
            r = c.post("/v1/admin/models", headers=auth(), json={"path": "nowhere", "name": "other"})
            assert r.status_code == 404 and r.json()["error"]["type"] == "path_not_found"
            message = r.json()["error"]["message"]
            assert "'nowhere' is in none of the server's model dirs" in message
            assert str(run_dir.parent.resolve()) in message and str(other.resolve()) in message
            r = c.post("/v1/admin/models", headers=auth(), json={"path": str(other / "gone")})
            assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]
    finally:
        running.stop()


# --- bug 3: a store that cannot be opened at startup ------------------------------------------------------
def test_a_store_that_fails_at_startup_counts_every_row_and_is_opened_once_it_can_be(
        run_dir, digits, tmp_path, monkeypatch, caplog):
    """QA: a --db store that could not be opened at startup turned recording off for good, and
    imagerec_predictions_unrecorded_total stayed 0. Every prediction is now either recorded or
    counted, and the store is tried again (back-off shortened here) until it opens."""
    from imagerec.serve import recording
    from imagerec.store import open_store
    from imagerec.store.schema import predictions

    monkeypatch.setattr(recording, "RETRY_FIRST_S", 0.1)
    monkeypatch.setattr(recording, "RETRY_MAX_S", 0.2)
    blocker = tmp_path / "store"
    blocker.write_text("a file where the store's folder should be")
    db = blocker / "preds.db"
    with caplog.at_level(logging.WARNING, logger="imagerec.serve"):
        running = start_thread_server(ServeSettings(models=(str(run_dir),), db=str(db)))
    try:
        warning = next(r.getMessage() for r in caplog.records if "not recorded for now" in r.getMessage())
        assert f"the store given by --db, {db}, cannot be opened" in warning and "IMAGEREC_DB" not in warning
        assert "imagerec_predictions_unrecorded_total" in warning
        with running.client() as c:
            for i in range(3):
                assert predict(c, digits[i]).status_code == 200
            deadline = time.monotonic() + 10
            while metric_value(c.get("/metrics").text, "imagerec_predictions_unrecorded_total") < 3:
                assert time.monotonic() < deadline, "the rows not recorded were not counted"
                time.sleep(0.05)
            blocker.unlink()  # the store can be opened now (a database that came up late)
            blocker.mkdir()
            sent, recorded = 3, 0
            deadline = time.monotonic() + 30
            while recorded == 0:
                assert time.monotonic() < deadline, "the store was never opened again"
                assert predict(c, digits[sent]).status_code == 200
                sent += 1
                time.sleep(0.1)
                if db.exists():
                    with open_store(str(db)) as store, store.read() as conn:
                        recorded = conn.execute(sa.select(sa.func.count()).select_from(predictions)).scalar_one()
            unrecorded = metric_value(c.get("/metrics").text, "imagerec_predictions_unrecorded_total")
    finally:
        running.stop()  # flushes what waits
    with open_store(str(db)) as store, store.read() as conn:
        recorded = conn.execute(sa.select(sa.func.count()).select_from(predictions)).scalar_one()
    assert unrecorded >= 3 and recorded >= 1 and recorded + unrecorded == sent  # none lost silently
    assert any("is open now" in r.getMessage() for r in caplog.records)


# --- bug 4 and 5: what a recorded prediction says -------------------------------------------------------------
def test_a_row_keeps_the_time_it_was_predicted(tmp_path):
    """QA: rows that waited for a locked store were stamped with the time the lock was released."""
    from imagerec.store import list_predictions, open_store, record_predictions

    with open_store(str(tmp_path / "s.db")) as store:
        record_predictions(store, "m", [
            {"sha256": "a" * 64, "topk": [], "created_at": "2025-01-02T03:04:05.250000+02:00"},
            {"sha256": "b" * 64, "topk": [], "created_at": "2025-01-02T03:04:06"},  # no offset: UTC
            {"sha256": "c" * 64, "topk": []},  # none given: now
        ])
        rows = list_predictions(store)
        assert [r["created_at"] for r in rows[:2]] == ["2025-01-02T01:04:05.250000+00:00", "2025-01-02T03:04:06+00:00"]
        assert rows[2]["created_at"] > "2026"
        with pytest.raises(ImageRecError, match="row 1: created_at must be a datetime or ISO 8601 text.*'yesterday'"):
            record_predictions(store, "m", [{"sha256": "d" * 64, "topk": [], "created_at": "yesterday"}])


def test_recorded_predictions_name_the_resolved_run_and_its_id(run_dir, key_file, digits, tmp_path, monkeypatch):
    """QA: the same run served from the command line (a relative path) and loaded through the admin
    API got two model_ids, and run_id was never filled although the run was in the store."""
    from imagerec.store import list_predictions, open_store, record_run_dir

    db = str(tmp_path / "store.db")
    with open_store(db) as store:
        run_id = record_run_dir(store, run_dir, "completed")
    monkeypatch.chdir(run_dir.parent)
    running = start_thread_server(ServeSettings(models=(f"prod@3={run_dir.name}",), db=db,
                                                api_key_file=str(key_file)))
    try:
        with running.client() as c:
            assert predict(c, digits[0]).status_code == 200
            r = c.post("/v1/admin/models", headers=auth(), json={"path": run_dir.name, "name": "prod", "version": "4"})
            assert r.status_code == 201, r.text
            assert predict(c, digits[1], "/v1/models/prod/versions/4/predict").status_code == 200
    finally:
        running.stop()
    with open_store(db) as store:
        rows = list_predictions(store)
    assert [(r["run_id"], r["model_id"]) for r in rows] == [(run_id, str(run_dir.resolve()))] * 2


# --- bug 6: unloading a version ---------------------------------------------------------------------------
def test_a_version_can_be_unloaded_and_running_requests_finish_on_it(run_dir, key_file, digits, tmp_path):
    """QA: a trial version whose folder was removed made every "reload all" fail until a restart,
    and there was no way to retire it."""
    trial = run_dir.parent / f"trial-{tmp_path.name}"
    shutil.copytree(run_dir, trial)
    running = start_thread_server(ServeSettings(models=(f"mnist@1={run_dir}",), api_key_file=str(key_file)))
    try:
        with running.client() as c:
            r = c.post("/v1/admin/models", headers=auth(), json={"path": trial.name, "name": "trial", "version": "1"})
            assert r.status_code == 201, r.text
            shutil.rmtree(trial)
            r = c.post("/v1/admin/reload", headers=auth(), json={})
            message = r.json()["error"]["message"]
            assert r.status_code == 422 and "trial@1 cannot be loaded" in message
            assert "unload it (DELETE /v1/admin/models/trial/versions/1) or reload them one at a time" in message

            assert c.delete("/v1/admin/models/trial/versions/1").status_code == 403  # admin key needed
            r = c.delete("/v1/admin/models/mnist/versions/1", headers=auth())
            assert r.status_code == 409 and r.json()["error"]["type"] == "model_is_default"
            assert "make another version the default first" in r.json()["error"]["message"]
            assert c.delete("/v1/admin/models/nope/versions/1", headers=auth()).status_code == 404

            slow = SlowUpload(running.url, "/v1/models/trial/versions/1/predict", digits[0])
            r = c.delete("/v1/admin/models/trial/versions/1", headers=auth())
            assert r.status_code == 200 and r.json() == {"unloaded": {"name": "trial", "version": "1"}}
            status, body = slow.finish()  # picked the version before it was unloaded: finishes on it
            assert status == 200 and body["model"] == "trial", body
            r = predict(c, digits[1], "/v1/models/trial/versions/1/predict")
            assert r.status_code == 404 and r.json()["error"]["type"] == "model_not_found"
            assert [m["name"] for m in c.get("/v1/models").json()["models"]] == ["mnist"]
            r = c.post("/v1/admin/reload", headers=auth(), json={})
            assert r.status_code == 200 and r.json()["reloaded"] == [{"name": "mnist", "version": "1"}]
            spec = c.get("/openapi.json").json()
            assert "409" in spec["paths"]["/v1/admin/models/{name}/versions/{version}"]["delete"]["responses"]
    finally:
        running.stop()
        shutil.rmtree(trial, ignore_errors=True)


def admin_on(folder: Path, worker: int, applied: list[str], gone: set[str]) -> Admin:
    """An Admin whose loads fail for the versions in `gone` (their folder was removed)."""
    def apply(action: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        what = f"{action['op']}:{action.get('name')}@{action.get('version')}"
        if action["op"] == "load" and f"{action['name']}@{action['version']}" in gone:
            raise FileNotFoundError(what)
        applied.append(what)
        return {}, action

    return Admin(apply, AdminLog(folder, worker), peer_timeout_s=1)


def test_a_worker_starting_later_skips_what_concerns_an_unloaded_version(tmp_path):
    first: list[str] = []
    a0 = admin_on(tmp_path, 0, first, set())
    a0.catch_up(startup=True)
    for action in (
        {"op": "load", "name": "trial", "version": "1", "make_default": False},
        {"op": "default", "name": "trial", "version": "1"},
        {"op": "reload", "name": "trial", "version": "1", "keys": False},
        {"op": "default", "name": "m", "version": "1"},
        {"op": "unload", "name": "trial", "version": "1"},  # loaded by the log: nothing to undo later
        {"op": "unload", "name": "old", "version": "1"},  # a startup model: a late worker unloads it too
        {"op": "load", "name": "trial", "version": "2", "make_default": False},
    ):
        a0.run(action)
    late: list[str] = []
    replay = admin_on(tmp_path, 1, late, gone={"trial@1"})
    replay.catch_up(startup=True)  # raised ReplayError on the load of trial@1 before
    assert late == ["default:m@1", "unload:old@1", "load:trial@2"]
    assert replay.log is not None and replay.log.ready and replay.log.applied == 7
    with pytest.raises(ReplayError):  # a version still served whose folder is gone: refused as before
        admin_on(tmp_path, 2, [], gone={"trial@2"}).catch_up(startup=True)


@pytest.mark.slow  # two worker processes, one of them restarted
def test_unload_reaches_every_worker_and_a_restarted_worker_skips_it(run_dir, key_file, tmp_path):
    """With --workers 2: the unload is applied by both, and a worker restarted after the unloaded
    version's folder was removed still starts (it stopped the server before)."""
    proc, url, log, _ = start_workers_serving_a_removed_version(run_dir, key_file, tmp_path)
    try:
        r = httpx.delete(url + "/v1/admin/models/mnist/versions/2", headers=auth(), timeout=120)
        assert r.status_code == 200 and r.json()["workers"]["applied"] == 2, r.text
        kill_one_worker(proc)
        time.sleep(1.0)  # the supervisor notices and starts another
        readiness(url, 2)  # both answer again
        assert proc.poll() is None, log.read_text()[-3000:]
        for _ in range(6):  # new connections: both workers
            with httpx.Client(base_url=url) as c:
                assert c.get("/v1/models/mnist/versions/2").status_code == 404
                assert c.get("/v1/models/mnist/versions/1").status_code == 200
    finally:
        stop_workers(proc)


# --- bug 7: a refused CORS preflight ---------------------------------------------------------------------
def test_a_refused_cors_preflight_gets_the_json_error_shape_and_is_counted(run_dir):
    good = "https://app.example"
    running = start_thread_server(ServeSettings(models=(str(run_dir),), cors_origins=(good,)))
    try:
        with running.client() as c:
            other = c.options("/v1/predict", headers={"Origin": "https://evil.example",
                                                      "Access-Control-Request-Method": "POST"})
            header = c.options("/v1/predict", headers={"Origin": good, "Access-Control-Request-Method": "POST",
                                                       "Access-Control-Request-Headers": "x-request-id"})
            ok = c.options("/v1/predict", headers={"Origin": good, "Access-Control-Request-Method": "POST",
                                                   "Access-Control-Request-Headers": "x-api-key"})
            metrics = c.get("/metrics").text
    finally:
        running.stop()
    for r in (other, header):
        assert r.status_code == 400 and r.headers["content-type"] == "application/json", r.text
        assert r.json()["error"]["type"] == "cors_rejected"
    assert "origin 'https://evil.example' is not allowed (allowed: https://app.example" in other.json()["error"]["message"]
    assert "access-control-allow-origin" not in other.headers
    assert "header(s) x-request-id not allowed" in header.json()["error"]["message"]
    assert header.headers["access-control-allow-origin"] == good  # the page can read why
    assert ok.status_code == 200
    assert metric_value(metrics, "imagerec_errors_total", type="cors_rejected") == 2


# --- bug 8: a store that stalls at shutdown --------------------------------------------------------------
def test_shutdown_waits_a_bounded_time_for_the_store_and_counts_what_it_leaves(caplog):
    """QA: with a lock held on the PostgreSQL table, SIGTERM did not stop the server until the lock
    was released: Recorder.close joined the writer without a timeout."""
    from prometheus_client.parser import text_string_to_metric_families

    from imagerec.serve import recording

    gate, written = threading.Event(), []

    def locked_store(rows: list[dict[str, Any]]) -> None:
        assert gate.wait(30)
        written.extend(rows)

    metrics = ServeMetrics()
    rec = recording.Recorder(ServeSettings(models=("x",), record_predictions=locked_store), metrics)
    rec.record([{"i": 0}])  # taken by the writer, which waits for the lock
    time.sleep(0.2)
    rec.record([{"i": 1}, {"i": 2}])  # waiting behind it
    closer = threading.Thread(target=rec.close, kwargs={"timeout": 0.5})
    with caplog.at_level(logging.WARNING, logger="imagerec.serve"):
        closer.start()
        closer.join(10)
    try:
        assert not closer.is_alive(), "close() waited for the store past its timeout"
        assert rec.dropped == 3
        assert "3 prediction(s) not recorded (3 so far): the store did not take them within 0.5 s" in caplog.text
    finally:
        gate.set()
    closer.join(10)
    time.sleep(0.2)  # the writer, unblocked, stops without writing more or counting twice
    assert written == [{"i": 0}] and rec.dropped == 3
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert families["imagerec_predictions_unrecorded"].samples[0].value == 3
