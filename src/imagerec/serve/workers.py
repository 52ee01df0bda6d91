"""Several server processes on one port (`imagerec serve --workers N`).

One server process is bound by its GIL: the event loop, multipart parsing and the Python half of
decoding all take turns on one interpreter, and on a fast CPU the request path, not the model,
sets the rate (README "Serving"). `--workers N` starts N worker processes that share the listening
socket (the kernel hands each new connection to one of them); each loads its own copies of the
models and runs its own batcher, and when N divides the cores each worker is pinned to its share
of them, so a request is parsed, decoded and inferred on one core without migrating.

What must look like one server:
- Admin actions (load or unload a version, switch the default, reload) arrive at one worker. `Admin` applies
  the action there, appends it to an `AdminLog` (JSON lines in the supervisor's state folder, under
  an exclusive file lock), and waits until every other live worker has applied it: each worker
  follows the log in a thread and records how far it got. A worker started later (or restarted after
  a crash) notes how long the log is before it reads its API key file and checkpoints (`AdminLog.begin`,
  which also makes it a peer that actions wait for), and after loading its startup models replays the
  log: every load, unload and default switch, and the reloads logged after that note (the earlier ones
  are in the files it read); what concerns a version unloaded later in the log is skipped (its folder
  may be gone: that is often why it was unloaded). A worker that cannot replay an action the others
  applied (a loaded version's folder was removed since) does not become ready, and so stops the
  server: it would not serve what the others serve.
- Metrics: every worker writes prometheus_client's multiprocess files in the state folder and
  `/metrics` from any worker sums them (ServeMetrics.render); the queue-depth and in-flight gauges
  count live workers only (the supervisor drops a dead worker's gauges).
- The supervisor restarts a worker that dies after it was ready; a worker that dies while
  starting (a model that cannot load) stops the server with its exit status instead of looping.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from multiprocessing.connection import wait as wait_for_exit
from pathlib import Path
from typing import Any

from imagerec.utils import ImageRecError, atomic_write, c_library, process_alive

log = logging.getLogger("imagerec.serve")

POLL_S = 0.05  # how often a worker looks for new admin actions
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class AdminLog:
    """The admin actions of one server, shared by its workers: an append-only JSON-lines file.

    `applied` is how many actions this process has applied; `report()` writes it (and any failure)
    to this worker's status file, which `wait_for_peers` reads and the supervisor reads for `ready`."""

    def __init__(self, folder: str | Path, worker: int) -> None:
        self.folder = Path(folder)
        self.path = self.folder / "admin.jsonl"
        self.worker = worker
        self.applied = 0
        self.failures: list[dict[str, Any]] = []
        self.files_read_at = 0  # the log's length when this worker began reading its key file and models
        self.ready = False  # set once the startup replay is done
        self.error: str | None = None  # why this worker cannot become ready
        self._status = self.folder / status_name(worker, os.getpid())

    def begin(self) -> None:
        """Call before reading the API key file and the startup checkpoints: notes how long the log is
        (reloads up to here are in what this worker is about to read) and, in the same step under the
        lock, makes this worker one that every later action waits for."""
        with self.exclusive():
            self.files_read_at = len(self.read())
            self.report()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Held by the worker appending an action (across processes): one admin action at a time."""
        with open(self.folder / "admin.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def read(self) -> list[dict[str, Any]]:
        """Every complete action in the log (a line still being written is left for next time)."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        return [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines() if line]

    def append(self, action: dict[str, Any]) -> int:
        """Append one action (call under `exclusive`); returns its sequence number (1-based)."""
        seq = len(self.read()) + 1
        with open(self.path, "ab") as f:
            f.write(json.dumps({**action, "seq": seq}).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        return seq

    def report(self) -> None:
        """Write this worker's progress where the other workers look for it."""
        with atomic_write(self._status) as f:
            f.write(json.dumps({
                "pid": os.getpid(), "worker": self.worker, "applied": self.applied, "failures": self.failures[-20:],
                "ready": self.ready, "error": self.error,
            }))

    def peers(self) -> list[dict[str, Any]]:
        """Status of every other live worker."""
        out = []
        for path in self.folder.glob("worker-*.json"):
            status = read_status(path)
            if not status:
                continue  # being replaced right now
            me = status["pid"] == os.getpid() and status["worker"] == self.worker
            if not me and process_alive(status["pid"]):
                out.append(status)
        return out

    def wait_for_peers(self, seq: int, timeout: float) -> dict[str, Any]:
        """Wait (up to `timeout` s) until every other live worker has applied action `seq`.
        Returns {"workers", "applied", "failed": [{worker, error}], "pending": [worker]}."""
        deadline = time.monotonic() + timeout
        while True:
            peers = self.peers()
            pending = [p for p in peers if p["applied"] < seq]
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        failed = [
            {"worker": p["worker"], "error": f["error"]}
            for p in peers for f in p["failures"] if f["seq"] == seq
        ]
        done = [p for p in peers if p["applied"] >= seq]
        return {
            "workers": 1 + len(peers),
            "applied": 1 + len(done) - len(failed),
            "failed": failed,
            "pending": sorted(p["worker"] for p in pending),
        }


def status_name(worker: int, pid: int) -> str:
    """A worker's status file: written when it begins reading its files, when it is ready (or cannot
    be), then after each admin action it applies."""
    return f"worker-{worker}-{pid}.json"


def read_status(path: Path) -> dict[str, Any]:
    """A worker's status ({} while there is none)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def describe(action: dict[str, Any]) -> str:
    """An admin action in words, for errors: what it did, to which version, from which path."""
    what = f"{action.get('name')}@{action.get('version')}"
    if action["op"] == "load":
        return f"#{action.get('seq')} load {what} from {action.get('path')}"
    if action["op"] == "reload":
        models = "all models" if action.get("name") is None else what
        return f"#{action.get('seq')} reload {models}" + (" and the API key file" if action.get("keys") else "")
    return f"#{action.get('seq')} {action['op']} {what}"


def superseded(actions: list[dict[str, Any]]) -> set[int]:
    """The sequence numbers of logged actions that a worker starting now skips: every action on a
    name@version before its last unload (a load from a folder that may be gone since, a default
    switch, a reload of it), and that unload too unless the version was one of the startup models
    (its first load or unload in the log is an unload: a load of a loaded version is never logged)."""
    first: dict[tuple[Any, Any], str] = {}
    last_unload: dict[tuple[Any, Any], int] = {}
    for action in actions:
        key = (action.get("name"), action.get("version"))
        if action["op"] in ("load", "unload"):
            first.setdefault(key, action["op"])
        if action["op"] == "unload":
            last_unload[key] = action["seq"]
    skip = set()
    for action in actions:
        key = (action.get("name"), action.get("version"))
        last = last_unload.get(key)
        if last is not None and (action["seq"] < last or (action["seq"] == last and first[key] == "load")):
            skip.add(action["seq"])
    return skip


class ReplayError(ImageRecError):
    """A worker cannot repeat an admin action that the others applied, so it must not serve."""


class PartlyApplied(Exception):
    """Raised by an admin action that failed but still changed this process (a reload whose models
    failed, all or nothing, while its API key file was re-read): the action is logged all the same,
    so every worker does what this one did, and `error` then goes to the client."""

    def __init__(self, error: Exception, repeat: dict[str, Any]) -> None:
        super().__init__(str(error))
        self.error, self.repeat = error, repeat
        self.workers: dict[str, Any] | None = None  # the peers' report, set by Admin.run


class Admin:
    """Runs admin actions on this worker's registry, and on every other worker's through the log.

    An action is a dict: {"op": "load", "path", "name", "version", "make_default"}, {"op":
    "default", "name", "version"}, {"op": "unload", "name", "version"} or {"op": "reload", "name",
    "version", "keys"}. With no log (one process) `run` just applies it."""

    def __init__(self, apply: Callable[[dict[str, Any]], tuple[Any, dict[str, Any]]], log: AdminLog | None,
                 peer_timeout_s: float = 120.0) -> None:
        # apply(action) -> (result for the client, the action as other workers must repeat it:
        # e.g. with the version number this worker assigned)
        self._apply = apply
        self.log = log
        self.peer_timeout_s = peer_timeout_s
        self._lock = threading.Lock()  # this process: the follower thread vs a request's action
        self._stop = threading.Event()

    def run(self, action: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
        """Apply `action` here and then everywhere; returns (result, the workers' report or None)."""
        if self.log is None:
            return self._apply(action)[0], None
        partly: PartlyApplied | None = None
        with self.log.exclusive():
            self.catch_up()
            with self._lock:
                try:
                    result, repeat = self._apply(action)  # raises: nothing is appended...
                except PartlyApplied as e:  # ...unless this process was changed all the same
                    # "partial": the others may fail in the same way (a replay at startup then goes on)
                    result, repeat, partly = None, {**e.repeat, "partial": True}, e
                seq = self.log.append(repeat)
                self.log.applied = seq
                self.log.report()
        report = self.log.wait_for_peers(seq, self.peer_timeout_s)
        if partly is not None:
            partly.workers = report
            raise partly
        return result, report

    def catch_up(self, startup: bool = False) -> None:
        """Apply the actions other workers appended since the last call.

        At startup (after `AdminLog.begin` and loading the startup models) reloads logged before
        `begin` are skipped: the key file and checkpoints were read after them; so are the actions on a
        version that a later action unloads (`superseded`). Any other action that
        fails at startup raises ReplayError (unless it failed in the worker that logged it too, a
        "partial" reload): this worker would serve something else than the others."""
        assert self.log is not None
        with self._lock:
            actions = self.log.read()[self.log.applied:]
            skipped = superseded(actions) if startup else set()
            for action in actions:
                in_files = startup and action["op"] == "reload" and action["seq"] <= self.log.files_read_at
                if not in_files and action["seq"] not in skipped:
                    try:
                        self._apply(action)
                    except Exception as e:  # noqa: BLE001 - reported to the worker that asked, and logged
                        error = e.error if isinstance(e, PartlyApplied) else e  # what failed
                        if startup and not (isinstance(e, PartlyApplied) and action.get("partial")):
                            self._refuse(action, error)
                        log.error("worker %d: admin action %s failed here: %s", self.log.worker, action, error)
                        self.log.failures.append({"seq": action["seq"], "error": f"{type(error).__name__}: {error}"[:500]})
                self.log.applied = action["seq"]
            if startup:
                self.log.ready = True
            if actions or startup:
                self.log.report()

    def _refuse(self, action: dict[str, Any], error: BaseException) -> None:
        """Stop this worker from becoming ready: it cannot repeat `action`, which the others applied."""
        assert self.log is not None
        self.log.error = (
            f"worker {self.log.worker} cannot repeat admin action {describe(action)}, which the other "
            f"workers applied ({type(error).__name__}: {error}"[:700]
            + "); it would serve a different state from them, so the server stops. Start it again "
            "(admin actions are not kept across restarts) and repeat the action from files that exist"
        )
        self.log.report()  # the supervisor prints the error
        raise ReplayError(self.log.error) from error

    def follow(self) -> None:
        """Start the thread that applies other workers' actions as they appear."""
        assert self.log is not None
        path = self.log.path

        def loop() -> None:
            size = -1
            while not self._stop.wait(POLL_S):
                try:
                    now = path.stat().st_size if path.exists() else 0
                    if now != size:
                        size = now
                        self.catch_up()
                except Exception:  # noqa: BLE001 - the follower must outlive any one bad action
                    log.exception("following the admin log failed")

        threading.Thread(target=loop, name="admin-log", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


# --- the supervisor ----------------------------------------------------------------------------------
def cpu_shares(workers: int) -> list[list[int] | None]:
    """The cores each worker is pinned to: equal disjoint shares when `workers` divides the
    available cores, else None (no pinning)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cpus or len(cpus) % workers:
        return [None] * workers
    per = len(cpus) // workers
    return [cpus[k * per : (k + 1) * per] for k in range(workers)]


def exit_with_parent(parent: int) -> None:
    """Have the kernel send this process SIGTERM when its supervisor dies: a supervisor killed with
    SIGKILL cannot stop its workers, and orphans would go on answering on the port (seen in testing)."""
    with contextlib.suppress(AttributeError, OSError):  # prctl is Linux's
        c_library().prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_main(settings: Any, sock: socket.socket, cpus: list[int] | None, parent: int) -> None:
    """One worker process: pin, then run an ordinary server on the shared socket."""
    exit_with_parent(parent)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    from imagerec.serve.app import create_server

    create_server(settings).run(sockets=[sock])


STATE_PREFIX = "imagerec-serve-"
SUPERVISOR_PID = "supervisor.pid"


def remove_stale_state(tmp: str | Path | None = None) -> list[Path]:
    """Remove the state folders of supervisors that are gone. A supervisor removes its own when it
    stops, but one killed with SIGKILL cannot; each holds its supervisor's pid, and a folder whose
    process no longer exists is removed by the next `run_workers`. Folders without a readable pid
    (someone else's, or one being made) are left alone."""
    removed = []
    for folder in Path(tmp or tempfile.gettempdir()).glob(STATE_PREFIX + "*"):
        try:
            pid = int((folder / SUPERVISOR_PID).read_text())
        except (OSError, ValueError):
            continue
        if not process_alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def run_workers(settings: Any) -> int:
    """Serve `settings` with `settings.workers` processes until SIGINT/SIGTERM; returns an exit status."""
    import uvicorn
    from prometheus_client import multiprocess

    from imagerec.serve.http import MAX_HEAD_BYTES
    from imagerec.serve.metrics import MULTIPROC_ENV

    if threading.current_thread() is not threading.main_thread():
        raise ImageRecError("serve with workers > 1 must run in the main thread: it stops its workers on "
                            "SIGINT/SIGTERM, and only the main thread receives signals")
    n = settings.workers
    for folder in remove_stale_state():
        log.info("removed %s, left by a serve --workers that was killed", folder)
    state = Path(tempfile.mkdtemp(prefix=STATE_PREFIX))
    (state / SUPERVISOR_PID).write_text(str(os.getpid()))
    metrics_dir = state / "metrics"
    metrics_dir.mkdir()
    os.environ[MULTIPROC_ENV] = str(metrics_dir)  # inherited by the spawned workers
    sock = uvicorn.Config(None, host=settings.host, port=settings.port,  # type: ignore[arg-type]
                          h11_max_incomplete_event_size=MAX_HEAD_BYTES).bind_socket()
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch/OpenVINO threads
    shares = cpu_shares(n)
    stopping = threading.Event()
    startup_error: str | None = None  # why a worker could not start, as it reported it
    ever_ready: dict[int, bool] = {}  # whether each worker slot has served: after that a failure is a restart's

    def start(k: int) -> Any:
        worker_settings = replace(settings, workers=1, worker_index=k, worker_count=n, worker_dir=str(state))
        proc = ctx.Process(target=_worker_main, args=(worker_settings, sock, shares[k], os.getpid()), name=f"imagerec-worker-{k}")
        proc.start()
        return proc

    def ready(k: int, proc: Any) -> bool:
        return bool(read_status(state / status_name(k, proc.pid)).get("ready"))

    def on_signal(signum: int, frame: Any) -> None:
        stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    procs = {k: start(k) for k in range(n)}
    was_ready = dict.fromkeys(procs, False)
    status = 0
    log.info("serving on http://%s:%d with %d worker processes%s", settings.host, settings.port, n,
             f", pinned to cores {shares}" if shares[0] is not None else "")
    try:
        while not stopping.is_set():
            wait_for_exit([p.sentinel for p in procs.values()], timeout=0.2)
            for k, proc in list(procs.items()):
                was_ready[k] = was_ready[k] or ready(k, proc)
                ever_ready[k] = ever_ready.get(k, False) or was_ready[k]
                if proc.is_alive() or stopping.is_set():
                    continue
                multiprocess.mark_process_dead(proc.pid, str(metrics_dir))
                refused = read_status(state / status_name(k, proc.pid)).get("error")
                (state / status_name(k, proc.pid)).unlink(missing_ok=True)
                if not was_ready[k]:
                    if refused and not any(ever_ready.values()):
                        startup_error = refused  # the server never started (a damaged checkpoint): one error line
                    else:
                        log.error("worker %d exited with status %s before it was ready; stopping the server%s", k,
                                  proc.exitcode, f": {refused}" if refused else "")
                    status = 1
                    stopping.set()
                    break
                log.warning("worker %d (pid %d) exited with status %s; starting another", k, proc.pid, proc.exitcode)
                procs[k], was_ready[k] = start(k), False
    finally:
        # Stop accepting at once: the port refuses new clients (which they retry elsewhere) once this
        # copy of the listening socket and the workers' copies (closed as each begins its shutdown)
        # are gone. Open, its backlog would take connections that no worker accepts, to reset later.
        sock.close()
        for proc in procs.values():
            if proc.is_alive():
                proc.terminate()  # uvicorn's graceful shutdown: running requests finish
        for proc in procs.values():
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for s, handler in previous.items():
            signal.signal(s, handler)
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(state, ignore_errors=True)
    if startup_error is not None:
        raise ImageRecError(startup_error)
    return status


def check_picklable(settings: Any) -> None:
    """Settings reach each worker as a copy (multiprocessing pickles them): a hook must be a function
    importable by name, as pickle needs, and this says so before any worker starts."""
    import importlib

    for name in ("record_predictions", "loader"):
        value = getattr(settings, name)
        if value is None:
            continue
        found: Any = None
        with contextlib.suppress(Exception):
            found = importlib.import_module(value.__module__)
            for part in value.__qualname__.split("."):
                found = getattr(found, part)
        if found is not value:
            raise ImageRecError(
                f"{name} must be a module-level function to serve with workers > 1 (each worker process "
                f"receives a copy); {value!r} cannot be found by its module and name"
            )
