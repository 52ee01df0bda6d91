"""`serve --workers N`: several server processes on one port that act as one server (admin actions
reach every worker, metrics are summed, a crashed worker is replaced and catches up)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import auth, free_port, metric_value

import imagerec
from imagerec.serve.settings import ServeSettings
from imagerec.serve.workers import (
    STATE_PREFIX,
    SUPERVISOR_PID,
    Admin,
    AdminLog,
    PartlyApplied,
    check_picklable,
    cpu_shares,
    remove_stale_state,
)

pytestmark = pytest.mark.timeout(300)


# --- the admin log, in one process (two workers = two Admin objects on one folder) ------------------
def recording_admin(folder: Path, worker: int, applied: list, fail_on: str | None = None) -> Admin:
    def apply(action: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if action["op"] == fail_on:
            raise RuntimeError(f"worker {worker} cannot {fail_on}")
        applied.append(action["op"] + ":" + str(action.get("version")))
        # like the registry: a load without a version gets one, which the others must repeat
        return {"ok": worker}, {**action, "version": action.get("version") or "7"}

    return Admin(apply, AdminLog(folder, worker), peer_timeout_s=10)


def test_admin_action_reaches_every_worker_with_the_version_assigned_first(tmp_path: Path) -> None:
    seen0: list[str] = []
    seen1: list[str] = []
    a0, a1 = recording_admin(tmp_path, 0, seen0), recording_admin(tmp_path, 1, seen1)
    for a in (a0, a1):
        a.catch_up(startup=True)
        a.follow()
    try:
        result, report = a0.run({"op": "load", "version": None})
        assert result == {"ok": 0}
        assert report == {"workers": 2, "applied": 2, "failed": [], "pending": []}
        assert seen0 == ["load:None"] and seen1 == ["load:7"]  # worker 1 repeats the assigned version
        _, report = a1.run({"op": "default", "version": "7"})  # either worker may receive an action
        assert report["applied"] == 2 and seen0[-1] == "default:7"
    finally:
        a0.stop()
        a1.stop()


def test_failure_in_another_worker_is_reported_and_late_workers_replay_the_log(tmp_path: Path) -> None:
    seen0: list[str] = []
    seen1: list[str] = []
    a0, a1 = recording_admin(tmp_path, 0, seen0), recording_admin(tmp_path, 1, seen1, fail_on="reload")
    for a in (a0, a1):
        a.catch_up(startup=True)
        a.follow()
    try:
        a0.run({"op": "load", "version": "2"})
        _, report = a0.run({"op": "reload", "version": None})
        assert report["workers"] == 2 and report["applied"] == 1
        assert report["failed"] == [{"worker": 1, "error": "RuntimeError: worker 1 cannot reload"}]
        # A worker started now (or restarted after a crash) replays loads and defaults, and only the
        # reloads logged after it began reading its key file and checkpoints (AdminLog.begin).
        seen2: list[str] = []
        late = recording_admin(tmp_path, 2, seen2)
        assert late.log is not None
        late.log.begin()
        reports: list[dict[str, Any] | None] = []
        thread = threading.Thread(target=lambda: reports.append(a0.run({"op": "reload", "version": "3"})[1]))
        thread.start()  # a reload while the late worker loads its startup models: the answer waits for it
        time.sleep(0.5)
        assert thread.is_alive()
        late.catch_up(startup=True)
        thread.join(10)
        assert seen2 == ["load:2", "reload:3"] and late.log.applied == 3 and late.log.ready
        assert reports[0] is not None and (reports[0]["workers"], reports[0]["applied"], reports[0]["pending"]) == (3, 2, [])
    finally:
        a0.stop()
        a1.stop()


def test_an_action_that_failed_but_changed_a_worker_still_reaches_the_others(tmp_path: Path) -> None:
    """A reload whose models fail (all or nothing) still re-reads the key file: the other workers
    must re-read theirs too, so the action is logged; an action that changed nothing is not."""
    seen: dict[int, list[str]] = {0: [], 1: []}

    def admin(worker: int) -> Admin:
        def apply(action: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            seen[worker].append(action["op"])
            if action["op"] == "reload":  # keys re-read, a model failed
                raise PartlyApplied(ValueError(f"worker {worker}: model m@1 cannot be loaded"), action)
            raise RuntimeError("nothing changed")

        return Admin(apply, AdminLog(tmp_path, worker), peer_timeout_s=10)

    a0, a1 = admin(0), admin(1)
    for a in (a0, a1):
        a.catch_up(startup=True)
        a.follow()
    try:
        with pytest.raises(PartlyApplied) as info:
            a0.run({"op": "reload", "version": None})
        assert str(info.value.error) == "worker 0: model m@1 cannot be loaded"
        assert info.value.workers is not None
        assert info.value.workers["failed"] == [{"worker": 1, "error": "ValueError: worker 1: model m@1 cannot be loaded"}]
        assert seen[1] == ["reload"]
        with pytest.raises(RuntimeError, match="nothing changed"):
            a0.run({"op": "load", "version": "1"})
        time.sleep(0.3)
        assert seen[1] == ["reload"] and a0.log is not None and len(a0.log.read()) == 1
    finally:
        a0.stop()
        a1.stop()


def test_a_half_written_line_is_not_read(tmp_path: Path) -> None:
    log = AdminLog(tmp_path, 0)
    with log.exclusive():
        assert log.append({"op": "default", "name": "m", "version": "1"}) == 1
    with open(log.path, "ab") as f:
        f.write(b'{"op": "default", "na')  # another worker is writing this line right now
    assert [a["seq"] for a in log.read()] == [1]


def test_cpu_shares_split_the_cores_evenly_or_not_at_all() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    assert cpu_shares(1) == [cpus]
    if len(cpus) >= 2 and len(cpus) % 2 == 0:
        shares = cpu_shares(2)
        assert sorted(shares[0] + shares[1]) == cpus and not set(shares[0]) & set(shares[1])
    assert cpu_shares(len(cpus) + 1) == [None] * (len(cpus) + 1)


# --- real worker processes behind one port -------------------------------------------------------------
def worker_pids(parent: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    out = []
    for pid in map(int, children):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except FileNotFoundError:
            pass
    return out


def readiness(url: str, workers: int, timeout: float = 120.0) -> dict[int, dict[str, Any]]:
    """/readyz from every worker (each new connection may reach any of them), by worker index."""
    seen: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < workers:
        assert time.monotonic() < deadline, f"workers ready: {sorted(seen)} of {workers}"
        try:
            r = httpx.get(url + "/readyz", timeout=5)
            if r.status_code == 200:
                body = r.json()
                seen[body["worker"]["index"]] = body
                continue
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return seen


def start_workers(log: Path, models: list[str], *extra: str) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagerec", "serve", *models, "--port", str(port), "--workers", "2", *extra],
        stdout=subprocess.DEVNULL, stderr=log.open("wb"),
    )
    return proc, f"http://127.0.0.1:{port}", log


def test_two_workers_act_as_one_server(run_dir: Path, run_dir_b: Path, key_file: Path, digits: list[bytes],
                                       tmp_path: Path) -> None:
    proc, url, log = start_workers(tmp_path / "serve.log", [f"mnist@1={run_dir}"], "--api-key-file", str(key_file))
    try:
        ready = readiness(url, 2)
        assert {b["worker"]["of"] for b in ready.values()} == {2}
        assert len(worker_pids(proc.pid)) == 2

        # Predictions on new connections (so both workers take some); the metrics, read through any
        # worker, count all of them.
        for i in range(24):
            r = httpx.post(url + "/v1/predict", headers=auth(), files={"file": ("d.png", digits[i], "image/png")})
            assert r.status_code == 200, r.text
        for _ in range(4):
            text = httpx.get(url + "/metrics").text
            assert metric_value(text, "imagerec_requests_total", route="/v1/predict", status="200") == 24
            assert metric_value(text, "imagerec_inflight_requests") == 0

        # An admin action sent to one worker is applied by both before the answer comes back.
        r = httpx.post(url + "/v1/admin/models", headers=auth(),
                       json={"path": str(run_dir_b), "name": "mnist", "make_default": True}, timeout=120)
        assert r.status_code == 201, r.text
        assert r.json()["version"] == "2"
        assert r.json()["workers"] == {"workers": 2, "applied": 2, "failed": [], "pending": []}
        for body in readiness(url, 2).values():
            assert body["default"] == {"name": "mnist", "version": "2"} and body["models"] == 2

        # A worker killed outright is replaced; the new one replays the admin log before it serves.
        victim = worker_pids(proc.pid)[0]
        environ = dict(v.split(b"=", 1) for v in Path(f"/proc/{victim}/environ").read_bytes().split(b"\0") if b"=" in v)
        metrics_dir = Path(environ[b"PROMETHEUS_MULTIPROC_DIR"].decode())
        assert (metrics_dir / f"gauge_livesum_{victim}.db").exists()
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while victim in worker_pids(proc.pid) or len(worker_pids(proc.pid)) < 2:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        time.sleep(1.0)
        for body in readiness(url, 2).values():
            assert body["default"] == {"name": "mnist", "version": "2"} and body["models"] == 2
        for i in range(8):
            r = httpx.post(url + "/v1/predict", headers=auth(), files={"file": ("d.png", digits[i], "image/png")})
            assert r.status_code == 200 and r.json()["version"] == "2", r.text
        text = httpx.get(url + "/metrics").text
        assert metric_value(text, "imagerec_inflight_requests") == 0
        assert not (metrics_dir / f"gauge_livesum_{victim}.db").exists()  # a dead worker's gauges are dropped
        # the killed worker's counts stay (24 before the kill + 8 after)
        assert metric_value(text, "imagerec_requests_total", route="/v1/predict", status="200") == 32

        # Admin still needs a key with workers.
        assert httpx.post(url + "/v1/admin/default", json={"name": "mnist", "version": "1"}).status_code == 403
        r = httpx.post(url + "/v1/admin/default", headers=auth(), json={"name": "mnist", "version": "1"})
        assert r.status_code == 200 and r.json()["workers"]["applied"] == 2

        # SIGTERM stops every worker and removes the shared state.
        workers = worker_pids(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not [p for p in workers if Path(f"/proc/{p}").exists() and b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert not metrics_dir.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "exited with status -9; starting another" in log.read_text()


def test_a_worker_that_cannot_start_stops_the_server(tmp_path: Path) -> None:
    broken = tmp_path / "broken-run"
    broken.mkdir()
    (broken / "config.yaml").write_text("not: a run\n")
    proc, url, log = start_workers(tmp_path / "serve.log", [str(broken)])
    try:
        assert proc.wait(120) != 0  # not an endless restart loop
    finally:
        if proc.poll() is None:
            proc.kill()
    # what stopped it is the command's one error line, as with one process (no traceback, no "worker 0 ...")
    text = log.read_text()
    assert proc.returncode == 2, text[-3000:]
    assert "Traceback" not in text and f"\nerror: {broken}" in text, text[-3000:]


def start_workers_serving_a_removed_version(run_dir: Path, key_file: Path, tmp_path: Path,
                                           **load: Any) -> tuple[subprocess.Popen, str, Path, Path]:
    """Two workers serving `run_dir` as mnist@1, and a copy of it loaded through the admin API as
    mnist@2 (`load`: more fields of the request, e.g. make_default=True) by both, whose folder is then
    removed: both still serve it from memory, but a restarted worker cannot load it again.
    (proc, url, log, the removed folder); the caller stops proc."""
    import shutil
    import uuid

    extra = run_dir.parent / f"mnist-gone-{uuid.uuid4().hex[:8]}"
    shutil.copytree(run_dir, extra)
    proc, url, log = start_workers(tmp_path / "serve.log", [f"mnist@1={run_dir}"], "--api-key-file", str(key_file))
    try:
        readiness(url, 2)
        r = httpx.post(url + "/v1/admin/models", headers=auth(), timeout=120,
                       json={"path": str(extra), "name": "mnist", "version": "2", **load})
        assert r.status_code == 201 and r.json()["workers"]["applied"] == 2, r.text
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    finally:
        shutil.rmtree(extra, ignore_errors=True)
    return proc, url, log, extra


def stop_workers(proc: subprocess.Popen) -> None:
    """SIGTERM the supervisor and wait for it (it waits for its workers); killed after 60 s."""
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def kill_one_worker(proc: subprocess.Popen) -> int:
    victim = worker_pids(proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    return victim


# A loader hook (in a module the workers import by name): the first call after the file $HOLD
# appears waits until $HOLD.go exists, so a test can act while a worker is loading its models.
HOLD_LOADER = """
import os, time
from pathlib import Path
import imagerec

def load(path):
    hold = Path(os.environ["HOLD"])
    try:
        hold.rename(hold.with_suffix(".held"))
    except FileNotFoundError:
        return imagerec.load(path)
    deadline = time.monotonic() + 60
    while not hold.with_suffix(".go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return imagerec.load(path)
"""


def test_a_reload_logged_while_a_worker_restarts_reaches_it(run_dir: Path, digits: list[bytes], tmp_path: Path) -> None:
    """The replacement of a killed worker reads the key file, then loads its models (held here until
    the reload is logged), then replays the admin log: the reload is applied there too, and its answer
    waits for that worker instead of counting it out."""
    old, new = "old-key-0123456789abcdefgh", "new-key-0123456789abcdefgh"
    keys = tmp_path / "keys.txt"
    keys.write_text(old + "\n")
    (tmp_path / "holdloader.py").write_text(HOLD_LOADER)
    hold = tmp_path / "hold"
    port = free_port()
    code = ("import sys, holdloader; from imagerec.serve import serve; "
            "serve([sys.argv[1]], port=int(sys.argv[2]), workers=2, api_key_file=sys.argv[3], loader=holdloader.load)")
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-c", code, f"mnist@1={run_dir}", str(port), str(keys)],
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"),
                            env={**os.environ, "PYTHONPATH": str(tmp_path), "HOLD": str(hold)})
    url = f"http://127.0.0.1:{port}"
    try:
        readiness(url, 2)
        hold.touch()
        kill_one_worker(proc)
        deadline = time.monotonic() + 120
        while not hold.with_suffix(".held").exists():  # the replacement has read the key file; its model waits
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.05)
        keys.write_text(new + "\n")  # the admin rotates the key and reloads
        answers: list[httpx.Response] = []
        reload = threading.Thread(target=lambda: answers.append(
            httpx.post(url + "/v1/admin/reload", headers={"X-API-Key": old}, json={}, timeout=120)))
        reload.start()
        time.sleep(1.0)
        hold.with_suffix(".go").touch()  # the replacement's model finishes loading
        reload.join(120)
        assert answers and answers[0].status_code == 200, answers and answers[0].text
        assert answers[0].json()["api_keys"] == 1
        assert answers[0].json()["workers"] == {"workers": 2, "applied": 2, "failed": [], "pending": []}
        # Each worker now takes the new key and refuses the old one.
        seen: dict[tuple[int, str], int] = {}
        deadline = time.monotonic() + 60
        while len({w for w, _ in seen}) < 2:
            assert time.monotonic() < deadline, seen
            with httpx.Client(base_url=url) as client:  # one connection: one worker
                worker = client.get("/readyz").json()["worker"]["index"]
                for name, key in (("old", old), ("new", new)):
                    r = client.post("/v1/predict", headers={"X-API-Key": key},
                                    files={"file": ("d.png", digits[0], "image/png")})
                    seen[(worker, name)] = r.status_code
        assert seen == {(0, "old"): 401, (0, "new"): 200, (1, "old"): 401, (1, "new"): 200}
    finally:
        stop_workers(proc)


def test_a_worker_that_cannot_replay_the_admin_log_stops_the_server(run_dir: Path, key_file: Path,
                                                                    tmp_path: Path) -> None:
    """A version loaded through the admin API whose folder is then removed: a restarted worker cannot
    load it, and must not serve without it (the other would answer with it): the server stops,
    naming the action and the path."""
    proc, _, log, extra = start_workers_serving_a_removed_version(run_dir, key_file, tmp_path, make_default=True)
    try:
        kill_one_worker(proc)
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 1, log.read_text()[-3000:]  # not serving a different default on one worker
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    assert "before it was ready; stopping the server: worker " in text
    assert f"cannot repeat admin action #1 load mnist@2 from {extra}" in text


def test_sigterm_refuses_new_connections_at_once_and_answers_running_requests(run_dir: Path, digits: list[bytes],
                                                                               tmp_path: Path) -> None:
    """As with one process: once SIGTERM arrives the port refuses new clients (they can retry
    elsewhere) while a request already on its way (a slow upload here) is still answered."""
    import socket

    proc, url, log = start_workers(tmp_path / "serve.log", [str(run_dir)])
    try:
        readiness(url, 2)
        port = int(url.rsplit(":", 1)[1])
        body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="d.png"\r\n'
                b"Content-Type: image/png\r\n\r\n" + digits[0] + b"\r\n--b--\r\n")
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:50])
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        refused = False
        deadline = time.monotonic() + 5
        while not refused and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()  # taken into the backlog
            except ConnectionRefusedError:
                refused = True
        slow.sendall(body[50:])
        slow.settimeout(30)
        answer = slow.recv(100)
        slow.close()
        assert refused, "new connections were still accepted 5 s after SIGTERM"
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_workers_exit_when_the_supervisor_is_killed(run_dir: Path, tmp_path: Path) -> None:
    proc, url, _ = start_workers(tmp_path / "serve.log", [str(run_dir)])
    try:
        readiness(url, 2)
        workers = worker_pids(proc.pid)
        environ = Path(f"/proc/{workers[0]}/environ").read_bytes().split(b"\0")
        state = Path(next(v for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")).split(b"=", 1)[1].decode())
        proc.kill()  # SIGKILL: the supervisor cannot stop anything itself
        proc.wait(10)
        deadline = time.monotonic() + 60
        while any(Path(f"/proc/{p}").exists() for p in workers):
            assert time.monotonic() < deadline, "orphaned workers still running"
            time.sleep(0.2)
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
    # What a killed supervisor leaves behind is removed by the next one to start (here: its cleanup
    # step alone), and a live supervisor's folder is not.
    live = tmp_path / (STATE_PREFIX + "live")
    live.mkdir()
    (live / SUPERVISOR_PID).write_text(str(os.getpid()))
    assert state.parent.is_dir()
    assert state.parent in remove_stale_state(state.parent.parent) and not state.parent.exists()
    assert remove_stale_state(tmp_path) == [] and live.is_dir()


def test_hooks_that_cannot_reach_a_worker_are_refused_before_it_starts(run_dir: Path) -> None:
    from imagerec.serve import serve
    from imagerec.utils import ImageRecError

    with pytest.raises(ImageRecError, match="record_predictions must be a module-level function"):
        serve([str(run_dir)], workers=2, record_predictions=lambda rows: None)
    check_picklable(ServeSettings(models=(str(run_dir),), loader=imagerec.load))  # importable: accepted


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_missing_model_folder_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: str) -> None:
    from imagerec.cli import main

    code = main(["serve", str(tmp_path / "never-trained"), "--workers", workers, "--port", str(free_port())])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: model not found: ") and "never-trained" in lines[0]


def test_workers_need_the_main_thread(run_dir: Path) -> None:
    import threading

    from imagerec.serve import serve
    from imagerec.utils import ImageRecError

    raised: list[BaseException] = []

    def run() -> None:
        try:
            serve([str(run_dir)], workers=2, port=free_port())
        except BaseException as e:  # noqa: BLE001 - collected for the assertion below
            raised.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert len(raised) == 1 and isinstance(raised[0], ImageRecError) and "main thread" in str(raised[0])
