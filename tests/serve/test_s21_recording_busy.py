"""Session 21, serve's prediction recorder: a SQLite store locked by another process is waited on for
STORE_WRITE_TIMEOUT_S, then its rows are kept and written once later, as for PostgreSQL (bug 2); rows
kept that way count towards MAX_PENDING_ROWS, past which the oldest are dropped and counted (bug 4);
lock timeouts are recognised from the driver's exception, also behind a SQLAlchemy DBAPIError (bug 6)."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from conftest import served_row, wait_for
from prometheus_client.parser import text_string_to_metric_families

from imagerec.serve import recording
from imagerec.serve.metrics import ServeMetrics
from imagerec.serve.settings import ServeSettings
from imagerec.store import list_predictions, open_store
from imagerec.store.engine import SQLITE_BUSY_TIMEOUT_MS
from imagerec.utils import ImageRecError


@pytest.fixture
def fast_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recording, "STORE_WRITE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(recording, "RETRY_FIRST_S", 0.1)
    monkeypatch.setattr(recording, "RETRY_MAX_S", 0.2)


# --- bug 2: SQLite "database is locked" ----------------------------------------------------------------
@pytest.mark.parametrize("begin", ["BEGIN IMMEDIATE", "BEGIN EXCLUSIVE"])
def test_a_locked_sqlite_store_keeps_the_rows_and_writes_each_once_later(
        tmp_path: Path, fast_retry: None, caplog: pytest.LogCaptureFixture, begin: str) -> None:
    caplog.set_level(logging.DEBUG, logger="imagerec.serve")
    db = str(tmp_path / "store.db")
    open_store(db).close()  # created before the lock is taken
    locker = sqlite3.connect(db, isolation_level=None)  # another process's write transaction
    locker.execute(begin)
    metrics = ServeMetrics()
    rec = recording.Recorder(ServeSettings(models=("x",), db=db), metrics)
    try:
        start = time.monotonic()
        rec.record([served_row(0), served_row(1)])
        wait_for(lambda: "did not take 2 prediction(s) in time (database is locked)" in caplog.text,
                 "the locked write was dropped or waited out SQLite's own 60 s busy timeout")
        assert time.monotonic() - start < 5
        rec.record([served_row(2)])  # comes while the store is busy: written after the others
        wait_for(lambda: caplog.text.count("the store is still busy") >= 2, "the rows were not tried again")
        assert rec.dropped == 0 and "not recorded" not in caplog.text
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    with open_store(db) as store:
        wait_for(lambda: len(list_predictions(store)) == 3, "the rows were not written once the lock was released")
        rec.close()
        rows = list_predictions(store)
    assert [(r["request_id"], r["served_as"]) for r in rows] == [(f"{i:032x}", "a@3") for i in range(3)]  # once each
    assert rec.dropped == 0 and "the store takes predictions again" in caplog.text
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert families["imagerec_predictions_unrecorded"].samples[0].value == 0


def test_the_store_hook_gives_up_on_a_sqlite_lock_after_the_write_timeout(tmp_path: Path, fast_retry: None) -> None:
    db = str(tmp_path / "store.db")
    hook = recording.StoreHook(db)
    assert hook.open()
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        start = time.monotonic()
        with pytest.raises(recording.StoreBusy) as busy:
            hook([served_row(0), served_row(1)])
        assert 0.25 < time.monotonic() - start < 3  # STORE_WRITE_TIMEOUT_S, not SQLite's 60 s
        assert str(busy.value) == "database is locked"
        assert [r["request_id"] for r in busy.value.rows] == [f"{i:032x}" for i in (0, 1)]
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    with hook.store.engine.connect() as conn:  # the pooled connection went back with the usual wait
        assert hook.store.engine.pool.checkedin() == 0  # the one the write used
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == SQLITE_BUSY_TIMEOUT_MS
    hook(busy.value.rows)
    assert [r["request_id"] for r in list_predictions(hook.store)] == [f"{i:032x}" for i in (0, 1)]
    hook.store.close()


# --- bug 4: requeued rows count towards MAX_PENDING_ROWS -------------------------------------------------
def test_rows_kept_for_a_busy_store_and_new_rows_together_stay_under_the_cap(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The writer holds 8 rows when the store turns out busy; 8 more came meanwhile. Kept together
    they were 16 with a cap of 10: now the 6 oldest are dropped, counted and logged, and the 10
    newest written, in order."""
    monkeypatch.setattr(recording, "MAX_PENDING_ROWS", 10)
    taken, release, written = threading.Event(), threading.Event(), []

    def busy_once(rows: list[dict]) -> None:
        if not taken.is_set():
            taken.set()
            assert release.wait(10)
            raise recording.StoreBusy("canceling statement due to lock timeout", rows, 0.05)
        written.extend(r["i"] for r in rows)

    metrics = ServeMetrics()
    rec = recording.Recorder(ServeSettings(models=("x",), record_predictions=busy_once), metrics)
    rec.record([{"i": i} for i in range(8)])
    assert taken.wait(5)
    rec.record([{"i": i} for i in range(8, 16)])  # waiting: 8 <= 10
    with caplog.at_level(logging.WARNING, logger="imagerec.serve"):
        release.set()
        wait_for(lambda: written, "the kept rows were not written after the back-off")
        rec.close()
    assert written == list(range(6, 16))
    assert rec.dropped == 6
    assert "6 prediction(s) not recorded (6 so far): the store is busy and 10 newer rows are waiting" in caplog.text
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert families["imagerec_predictions_unrecorded"].samples[0].value == 6


# --- bug 6: which store errors are lock timeouts ----------------------------------------------------------
def store_error(cause: BaseException) -> ImageRecError:
    err = ImageRecError("the image store failed")
    err.__cause__ = cause
    return err


@pytest.mark.parametrize("cause, timed_out", [
    (psycopg.errors.LockNotAvailable("canceling statement due to lock timeout"), True),  # as the store raises it
    (psycopg.errors.QueryCanceled("canceling statement due to statement timeout"), True),
    (sa.exc.OperationalError("INSERT", {}, psycopg.errors.LockNotAvailable("lock timeout")), True),  # DBAPIError.orig
    (sqlite3.OperationalError("database is locked"), True),
    (psycopg.errors.DiskFull("could not extend file"), False),
    (sqlite3.OperationalError("disk I/O error"), False),
    (sqlite3.OperationalError("database table is locked"), False),  # SQLITE_LOCKED: not another process
    (ValueError("database is locked"), False),
])
def test_lock_timeouts_are_recognised_from_the_drivers_exception(cause: BaseException, timed_out: bool) -> None:
    assert recording._timed_out(store_error(cause)) is timed_out


def test_a_real_sqlite_busy_error_is_recognised_by_its_code(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    a = sqlite3.connect(db, isolation_level=None, timeout=0)
    b = sqlite3.connect(db, isolation_level=None, timeout=0)
    a.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError) as info:
        b.execute("BEGIN IMMEDIATE")
    a.execute("ROLLBACK")
    a.close()
    b.close()
    assert recording._timed_out(store_error(info.value))
