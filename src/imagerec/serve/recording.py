"""Optional recording of predictions: a hook called off the request path with plain dict rows.

The hook is `settings.record_predictions(rows)`, or, when only `db` is set, `StoreHook`: the store's
`imagerec.store.record_predictions(store, model_id, rows)` on `imagerec.store.open_store(db)`, with
the served run directory or bundle, resolved, as `model_id` (and the run's id where the store holds
that run). The store is imported lazily and opened at startup; one that cannot be opened then (a
database not created yet, or not up yet after a reboot) is tried again, with a back-off, while
predictions go on: every row not recorded meanwhile is counted and logged like any other.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from imagerec.serve.metrics import ServeMetrics
from imagerec.serve.settings import ServeSettings
from imagerec.utils import ImageRecError

log = logging.getLogger("imagerec.serve")
# Rows waiting to be written. The writer takes everything waiting in one go, so a store that stalls
# (a table lock, a backup) only lets rows pile up here: 100k rows are ~50 MB. Beyond that they are
# dropped, counted (imagerec_predictions_unrecorded_total) and logged, never queued without bound.
MAX_PENDING_ROWS = 100_000
WRITE_CHUNK = 5_000  # rows per hook call
# A store that could not be opened is tried again when rows come, RETRY_FIRST_S after the failure,
# then twice as long after each failure, up to RETRY_MAX_S: a database that comes up later is used
# within a minute, and one that never does costs one connection attempt a minute.
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 60.0
# At shutdown the rows still waiting get this long to be written: a store that stalls (a table lock
# held by a backup) must not keep the process alive until a supervisor kills it.
CLOSE_TIMEOUT_S = 5.0


class StoreNotOpen(Exception):
    """The --db store is not open (yet): rows cannot be recorded now."""


class StoreHook:
    """Records rows in the store given by `db`; opens it on first use, and again after a failure
    to open, no sooner than the back-off allows (never on a request's thread: the recorder's)."""

    def __init__(self, db: str) -> None:
        self.db = db
        self.store: Any = None
        self._record: Any = None
        self._retry_at = 0.0
        self._backoff = RETRY_FIRST_S
        self.problem: str | None = None  # why the store is not open

    def open(self) -> bool:
        """Open the store now (creating and migrating it if needed); False, and a warning on the
        first failure, when it cannot be."""
        try:
            from imagerec.store import open_store, record_predictions  # type: ignore[attr-defined]
        except ImportError as e:  # nothing to retry: the package itself is missing
            self._retry_at = float("inf")
            self.problem = f"the store cannot be imported ({type(e).__name__}: {e})"
            log.warning("predictions will not be recorded: %s; every prediction is counted in "
                        "imagerec_predictions_unrecorded_total", self.problem)
            return False
        try:
            self.store, self._record = open_store(self.db), record_predictions
        except Exception as e:  # noqa: BLE001 - the store is optional: a failure only delays recording
            first = self.problem is None
            self.problem = f"the store given by --db, {_display(self.db)}, cannot be opened ({_reason(e)})"
            self._retry_at = time.monotonic() + self._backoff
            if first:
                log.warning(
                    "predictions are not recorded for now: %s; create or fix it, or restart with another --db. "
                    "It is tried again after %g s, then at most every %g s, and recording starts once it "
                    "opens; until then every prediction is counted in imagerec_predictions_unrecorded_total",
                    self.problem, self._backoff, RETRY_MAX_S,
                )
            else:
                log.debug("the store is still not open: %s", self.problem)
            self._backoff = min(2 * self._backoff, RETRY_MAX_S)
            return False
        if self.problem is not None:
            log.warning("the store given by --db, %s, is open now: predictions are recorded from now on", _display(self.db))
        self.problem, self._backoff = None, RETRY_FIRST_S
        return True

    def __call__(self, rows: list[dict[str, Any]]) -> None:
        if self.store is None and (time.monotonic() < self._retry_at or not self.open()):
            raise StoreNotOpen(self.problem)
        by_model: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_model.setdefault(row["model_path"], []).append(row)
        for model_id, group in by_model.items():
            # model_id: the resolved run dir or bundle (ModelEntry.source); record_predictions fills
            # run_id where the store has a run with that run_dir, and stores each row's created_at
            self._record(self.store, model_id, group)


def _display(db: str) -> str:
    """The store URL as it may be logged (no password)."""
    try:
        from imagerec.store.engine import mask_url

        return mask_url(db)
    except ImportError:
        return "(the store URL)"


def _reason(e: BaseException) -> str:
    """What the database said (its first line), without the store's hints for other commands (they
    name $IMAGEREC_DB; the server's store comes from --db)."""
    cause = e.__cause__ if isinstance(e, ImageRecError) else None
    if cause is not None:
        text = str(getattr(cause, "orig", None) or cause).strip()
        return text.splitlines()[0] if text else type(cause).__name__
    return f"{type(e).__name__}: {e}"


class Recorder:
    """Writes prediction rows off the request path, on one thread, in as few calls as it can."""

    def __init__(self, settings: ServeSettings, metrics: ServeMetrics | None = None) -> None:
        self.hook = settings.record_predictions
        if self.hook is None and settings.db:
            store = StoreHook(settings.db)
            store.open()  # at startup: creates or migrates the store, or says why it cannot
            self.hook = store
        self.metrics = metrics
        self._rows: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._closing = False
        self._writing = 0  # rows taken by the writer and not written yet
        self._abandoned = False  # close() gave up waiting for the writer and counted what it held
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="record", daemon=True) if self.hook else None
        if self._thread is not None:
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self.hook is not None

    def record(self, rows: list[dict[str, Any]]) -> None:
        if self._thread is None or not rows:
            return
        with self._cond:
            if not self._abandoned and len(self._rows) + len(rows) <= MAX_PENDING_ROWS:
                self._rows.extend(rows)
                self._cond.notify()
                return
            why = ("the server has stopped recording (shutting down)" if self._abandoned
                   else f"{MAX_PENDING_ROWS} rows are already waiting for the store")
        self._drop(len(rows), why)

    def _drop(self, n: int, why: str) -> None:
        with self._cond:
            first = self.dropped == 0
            self.dropped += n
            total = self.dropped
        if self.metrics is not None:
            self.metrics.unrecorded.inc(n)
        if first or total // 10_000 != (total - n) // 10_000:  # the first drop, then every 10k rows
            log.warning("%d prediction(s) not recorded (%d so far): %s", n, total, why)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._rows and not self._closing:
                    self._cond.wait()
                if not self._rows:
                    return  # closing, and everything is written
                rows, self._rows = self._rows, []
                self._writing = len(rows)
            for i in range(0, len(rows), WRITE_CHUNK):
                chunk = rows[i : i + WRITE_CHUNK]
                error = self._write(chunk)
                with self._cond:
                    if self._abandoned:
                        return  # close() has counted these rows already
                    self._writing -= len(chunk)
                if error is not None:
                    self._drop(len(chunk), error)

    def _write(self, rows: list[dict[str, Any]]) -> str | None:
        """Hand rows to the hook; why they were not recorded, or None."""
        try:
            assert self.hook is not None
            self.hook(rows)
        except StoreNotOpen as e:
            return str(e)
        except Exception as e:  # noqa: BLE001 - recording must never break serving
            log.debug("recording failed", exc_info=True)
            return f"the store refused them ({type(e).__name__}: {e})"
        return None

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Write what is waiting, then stop (called at shutdown, after the last request). A store
        that takes longer than `timeout` s (a lock held on it) is given up on: the rows not written
        are counted and logged, and the writer thread is left behind (a daemon: it does not keep
        the process alive)."""
        if self._thread is None:
            return
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            return
        with self._cond:
            n = len(self._rows) + self._writing
            self._rows, self._writing, self._abandoned = [], 0, True
        if n:
            self._drop(n, f"the store did not take them within {timeout:g} s of shutdown (a lock held on it, "
                          "or a connection that stalls); the server stops without them")
