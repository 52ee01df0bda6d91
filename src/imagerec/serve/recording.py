"""Optional recording of predictions: a hook called off the request path with plain dict rows.

The hook is `settings.record_predictions(rows)`, or, when only `db` is set, `StoreHook`: the store's
`imagerec.store.record_predictions(store, model_id, rows)` on `imagerec.store.open_store(db)`, with
the served run directory or bundle, resolved, as `model_id` (and the run's id where the store holds
that run). The store is imported lazily and opened at startup; one that cannot be opened then (a
database not created yet, or not up yet after a reboot) is tried again, with a back-off, while
predictions go on: every row not recorded meanwhile is counted and logged like any other.
Each row is recorded with the served version ("name@version") and the request_id of its answer.
A write that a lock holds up (PostgreSQL: a LOCK TABLE, say; SQLite: another process's write
transaction) fails after STORE_WRITE_TIMEOUT_S, writing nothing, and its rows are kept and written
again after the same back-off: once each, never waited on for good. Rows kept that way count towards
MAX_PENDING_ROWS like new ones: past it the oldest are dropped, counted and logged.
A SQLite store file deleted, moved away or replaced while serving (a cleanup job, log rotation, a
mistaken rm) is noticed before the next write: the path no longer names the file that was opened (its
st_dev/st_ino), and the open connections would go on writing into the old file, lost with it if it
was deleted. It is logged as an error, once, naming the file; the old file gets what its WAL holds
(a checkpoint) and is closed. The path is then opened again as at startup (open_store creates a
store where none is, or opens the file put there), unless the old file's -wal or -shm are still there
(a file moved away without them): a store opened beside them would share them with the old file's
other users, so it is not, and until they are gone (or the server restarts) every row is counted and
logged as unrecorded, tried again with the back-off above. /readyz is not affected, as for a store
that is down: recording is optional and never stops serving.
"""

from __future__ import annotations

import logging
import os
import sqlite3
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
# The longest one write to a --db store may wait for a lock (PostgreSQL: twice that to run; see
# Store.write): past it the write fails, writing nothing, and its rows are tried again after the
# back-off above instead of the writer waiting behind someone's LOCK TABLE (PostgreSQL) or write
# transaction (SQLite) for as long as it is held. Under CLOSE_TIMEOUT_S, so a write held up by a
# lock at shutdown fails before the server gives up on it.
STORE_WRITE_TIMEOUT_S = 3.0
# What PostgreSQL says when it cancels a statement for a lock_timeout or statement_timeout: the
# transaction was rolled back, so nothing was written and the rows can be written again.
TIMED_OUT_SQLSTATES = frozenset({"55P03", "57014"})  # lock_not_available, query_canceled
# What SQLite says when another connection held the write lock past the busy timeout (SQLITE_BUSY,
# "database is locked"): BEGIN IMMEDIATE took no lock, or the transaction was rolled back, so
# nothing was written either. (sqlite_errorcode is Python 3.11+; 3.10 has only the message.)
SQLITE_BUSY = 5


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
        self._path: str | None = None  # SQLite: the store file, and the file (st_dev, st_ino) opened there
        self._file: tuple[int, int] | None = None
        self._sidecars: dict[str, tuple[int, int] | None] = {}  # its -wal and -shm, as last seen

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
            if (stale := self._stale_sidecars()):
                raise StoreNotOpen(
                    f"{' and '.join(stale)}, left by the store file that was moved away or deleted while serving, "
                    "are still there: a new store beside them would share them with the old file; once no process "
                    "uses the old file any more, remove them, or restart the server"
                )
            self.store, self._record = open_store(self.db), record_predictions
        except StoreNotOpen as e:
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(2 * self._backoff, RETRY_MAX_S)
            if self.problem != str(e):
                log.error("predictions are not recorded for now: %s; every prediction is counted in "
                          "imagerec_predictions_unrecorded_total", e)
            self.problem = str(e)
            return False
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
        self._path = self.store.url.database if self.store.dialect == "sqlite" else None
        self._file = _file_identity(self._path) if self._path else None
        self._note_sidecars()
        return True

    def _note_sidecars(self) -> None:
        """Remember which -wal and -shm files belong to the store file now open (SQLite)."""
        self._sidecars = {p: _file_identity(p) for p in (f"{self._path}-wal", f"{self._path}-shm")} if self._path else {}

    def _stale_sidecars(self) -> list[str]:
        """The old store file's -wal and -shm still at the path after that file went (see _check_file)."""
        return [p for p, seen in self._sidecars.items() if seen is not None and _file_identity(p) == seen]

    def _check_file(self) -> None:
        """SQLite: close the store when its path no longer names the file that was opened (deleted,
        moved away or replaced), so that the next open() opens the path again; the open connections
        would go on writing into the old file (lost with it if it was deleted). Logged once, an error."""
        if self._file is None or self._path is None:
            return
        now = _file_identity(self._path)
        if now == self._file:
            self._note_sidecars()  # a -wal made by the last write
            return
        what = "deleted or moved away" if now is None else "replaced by another file"
        log.error(
            "the store file given by --db, %s, was %s while serving: predictions recorded before are in the old file "
            "(lost with it if it was deleted). The path is opened again, as at startup: where no file is, a new empty "
            "store is created (it holds no runs, so its predictions have no run_id). To keep all rows in one store, "
            "put the old file back and restart, or restart with another --db",
            self._path, what,
        )
        old, self.store, self._file = self.store, None, None
        try:  # what the old file's WAL holds goes into that file (a file moved without its -wal keeps it)
            raw = old.engine.raw_connection()
            try:
                raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                raw.close()
        except Exception:  # noqa: BLE001 - the old file is gone: a failure here loses nothing more
            log.debug("checkpointing the old store file failed", exc_info=True)
        try:
            old.close()
        except Exception:  # noqa: BLE001
            log.debug("closing the old store failed", exc_info=True)
        self._retry_at, self._backoff = 0.0, RETRY_FIRST_S

    def close(self) -> None:
        """Close the store at shutdown: SQLite folds its -wal into the file and removes -wal and -shm
        when its last connection closes, so a stopped server leaves one file, as a finished run does."""
        store, self.store = self.store, None
        if store is not None:
            try:
                store.close()
            except Exception:  # noqa: BLE001 - shutting down: what was committed is in the store already
                log.debug("closing the store failed", exc_info=True)

    def __call__(self, rows: list[dict[str, Any]]) -> None:
        """Write `rows`, one transaction per served model. A write that times out on a lock
        raises StoreBusy with the rows of that model and of the models after it (those before
        it are written: trying them again would record them twice)."""
        if self.store is not None:
            self._check_file()
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
                if not _timed_out(e):
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


def _file_identity(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file at `path`, None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _display(db: str) -> str:
    """The store URL as it may be logged (no password)."""
    try:
        from imagerec.store.engine import mask_url

        return mask_url(db)
    except ImportError:
        return "(the store URL)"


def _driver_error(e: BaseException) -> BaseException | None:
    """The database driver's own exception behind a store error, or None. The store raises its
    ImageRecError from the driver's exception itself (imagerec.store.engine's handle_error hook,
    which SQLAlchemy re-raises `from` the DBAPI exception); a SQLAlchemy DBAPIError there instead
    holds it as `.orig`, the documented attribute, and is unwrapped the same way."""
    cause = e.__cause__ if isinstance(e, ImageRecError) else None
    return getattr(cause, "orig", None) or cause


def _timed_out(e: ImageRecError) -> bool:
    """Whether the store refused a write only because a lock was held past its timeout, writing
    nothing: PostgreSQL's lock or statement timeout, or SQLite's "database is locked"."""
    error = _driver_error(e)
    if getattr(error, "sqlstate", None) in TIMED_OUT_SQLSTATES:  # psycopg.Error.sqlstate
        return True
    if not isinstance(error, sqlite3.OperationalError):
        return False
    code = getattr(error, "sqlite_errorcode", None)  # extended codes keep the primary one in the low byte
    return code & 0xFF == SQLITE_BUSY if isinstance(code, int) else str(error).startswith("database is locked")


def _reason(e: BaseException) -> str:
    """What the database said (its first line), without the store's hints for other commands (they
    name $IMAGEREC_DB; the server's store comes from --db)."""
    error = _driver_error(e)
    if isinstance(e, ImageRecError) and (error is None or isinstance(error, ImageRecError)):
        return str(e)  # the store's own message with its own advice (a migration held up by a lock)
    if error is not None:
        text = str(error).strip()
        return text.splitlines()[0] if text else type(error).__name__
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
        waiting, to be written after the back-off; False when close() has counted them already.
        Together they are held to MAX_PENDING_ROWS: past it the oldest (the front) are dropped."""
        with self._cond:
            if self._abandoned:
                return False
            self._rows[:0] = busy.rows + rest
            over = max(0, len(self._rows) - MAX_PENDING_ROWS)
            del self._rows[:over]
            self._writing = 0
            self._retry_at = time.monotonic() + busy.retry_in
            first = self._busy_since is None
        if over:
            self._drop(over, f"the store is busy and {MAX_PENDING_ROWS} newer rows are waiting for it (the oldest are "
                             "dropped)")
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
            if isinstance(self.hook, StoreHook):  # the writer is done with it
                self.hook.close()
            return
        with self._cond:
            n = len(self._rows) + self._writing
            self._rows, self._writing, self._abandoned = [], 0, True
        if n:
            self._drop(n, f"the store did not take them within {timeout:g} s of shutdown (a lock held on it, "
                          "or a connection that stalls); the server stops without them")
