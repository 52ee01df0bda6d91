"""Optional recording of predictions: a hook called off the request path with plain dict rows.

The hook is `settings.record_predictions(rows)`, or, when only `db` is set, `StoreHook`: the store's
`imagerec.store.record_predictions(store, model_id, rows)` on `imagerec.store.open_store(db)`, with
the served run directory or bundle, resolved, as `model_id` (and the run's id where the store holds
that run). The store is imported lazily and opened at startup; one that cannot be opened then (a
database not created yet, or not up yet after a reboot) is tried again, with a back-off, while
predictions go on: every row not recorded meanwhile is counted and logged like any other.
Each row is recorded with the served version ("name@version") and the request_id of its answer.
A write that a PostgreSQL lock holds up fails after STORE_WRITE_TIMEOUT_S, writing nothing, and
its rows are kept and written again after the same back-off: once each, never waited on for good.
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
# The longest one write to a PostgreSQL --db store may wait for a lock (twice that to run: see
# Store.write): past it the write fails, writing nothing, and its rows are tried again after the
# back-off above instead of the writer waiting behind someone's LOCK TABLE for as long as it is
# held. Under CLOSE_TIMEOUT_S, so a write held up by a lock at shutdown fails before the server
# gives up on it.
STORE_WRITE_TIMEOUT_S = 3.0
# What PostgreSQL says when it cancels a statement for a lock_timeout or statement_timeout: the
# transaction was rolled back, so nothing was written and the rows can be written again.
TIMED_OUT_SQLSTATES = frozenset({"55P03", "57014"})  # lock_not_available, query_canceled


class StoreNotOpen(Exception):
    """The --db store is not open (yet): rows cannot be recorded now."""


class StoreBusy(Exception):
    """The --db store did not take a write in time (a lock held on it): `rows` were not written,
    none of them, and are to be tried again in `retry_in` s."""

    def __init__(self, reason: str, rows: list[dict[str, Any]], retry_in: float) -> None:
        super().__init__(reason)
        self.rows, self.retry_in = rows, retry_in


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
        """Write `rows`, one transaction per served model. A write that times out on a lock
        raises StoreBusy with the rows of that model and of the models after it (those before
        it are written: trying them again would record them twice)."""
        if self.store is None and (time.monotonic() < self._retry_at or not self.open()):
            raise StoreNotOpen(self.problem)
        by_model: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_model.setdefault(row["model_path"], []).append(row)
        groups = list(by_model.items())
        for k, (model_id, group) in enumerate(groups):
            # model_id: the resolved run dir or bundle (ModelEntry.source); record_predictions fills
            # run_id where the store has a run with that run_dir, and stores each row's created_at
            try:
                self._record(self.store, model_id, [_store_row(r) for r in group], timeout_s=STORE_WRITE_TIMEOUT_S)
            except ImageRecError as e:
                if getattr(e.__cause__, "sqlstate", None) not in TIMED_OUT_SQLSTATES:
                    raise
                retry_in, self._backoff = self._backoff, min(2 * self._backoff, RETRY_MAX_S)
                raise StoreBusy(_reason(e), [r for _, g in groups[k:] for r in g], retry_in) from e
        self._backoff = RETRY_FIRST_S


def _store_row(row: dict[str, Any]) -> dict[str, Any]:
    """A served prediction as the store records it: with the served version as "name@version"
    (what the answer's X-Model-Version said) beside the answer's request_id."""
    if row.get("model") is not None and row.get("version") is not None:
        return {**row, "served_as": f"{row['model']}@{row['version']}"}
    return row


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
        self._retry_at = 0.0  # the store was busy: rows waiting are written again no sooner than this
        self._busy_since: float | None = None  # when the store's current busy spell began (for the log)
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
                # rows wait while the store is busy (a back-off), except at shutdown: then they get
                # one more try each STORE_WRITE_TIMEOUT_S until close() gives up on them
                while not self._closing and (not self._rows or time.monotonic() < self._retry_at):
                    self._cond.wait(max(0.0, self._retry_at - time.monotonic()) if self._rows else None)
                if not self._rows:
                    return  # closing, and everything is written
                rows, self._rows = self._rows, []
                self._writing = len(rows)
            for i in range(0, len(rows), WRITE_CHUNK):
                chunk = rows[i : i + WRITE_CHUNK]
                try:
                    error = self._write(chunk)
                except StoreBusy as busy:
                    if not self._requeue(busy, rows[i + WRITE_CHUNK :]):
                        return
                    break
                with self._cond:
                    if self._abandoned:
                        return  # close() has counted these rows already
                    self._writing -= len(chunk)
                if error is not None:
                    self._drop(len(chunk), error)
            else:
                if self._busy_since is not None:
                    log.warning("the store takes predictions again (it was busy for %.0f s)",
                                time.monotonic() - self._busy_since)
                self._busy_since = None

    def _requeue(self, busy: StoreBusy, rest: list[dict[str, Any]]) -> bool:
        """Put the rows the busy store did not take, and those after them, back in front of the rows
        waiting, to be written after the back-off; False when close() has counted them already."""
        with self._cond:
            if self._abandoned:
                return False
            self._rows[:0] = busy.rows + rest
            self._writing = 0
            self._retry_at = time.monotonic() + busy.retry_in
            first = self._busy_since is None
        if first:
            self._busy_since = time.monotonic()
            log.warning("the store did not take %d prediction(s) in time (%s): they are kept and tried again "
                        "in %g s, then with a back-off up to %g s", len(busy.rows) + len(rest), busy, busy.retry_in,
                        RETRY_MAX_S)
        else:
            log.debug("the store is still busy (%s): trying again in %g s", busy, busy.retry_in)
        return True

    def _write(self, rows: list[dict[str, Any]]) -> str | None:
        """Hand rows to the hook; why they were not recorded, or None. StoreBusy passes through:
        those rows are to be written again, not dropped."""
        try:
            assert self.hook is not None
            self.hook(rows)
        except StoreBusy:
            raise
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
