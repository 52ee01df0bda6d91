"""QA pass 7, store: predictions say which served version and which HTTP request made them (schema
revision 0002, upgraded in place from 0001); the recorder's PostgreSQL writes wait a bounded time
for a lock and are tried again, never lost nor doubled; compare_runs refuses ids no run can have."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from imagerec.cli import main
from imagerec.serve import recording
from imagerec.serve.metrics import ServeMetrics
from imagerec.serve.settings import ServeSettings
from imagerec.store import compare_runs, list_predictions, migrate, open_store, record_predictions, record_run
from imagerec.store.db import current_revision, head_revision
from imagerec.store.engine import create_store_engine, resolve_url
from imagerec.store.schema import predictions
from imagerec.utils import ImageRecError

# predictions and runs as revision 0001 created them (the test must not lean on the live schema)
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_v1 = sa.MetaData()
RUNS_0001 = sa.Table(
    "runs", _v1, sa.Column("id", sa.Integer, primary_key=True), sa.Column("name", sa.String(200)),
    sa.Column("run_dir", sa.Text), sa.Column("config", _JSON), sa.Column("metrics", _JSON), sa.Column("versions", _JSON),
    sa.Column("status", sa.String(32)), sa.Column("started_at", sa.DateTime(timezone=True)),
)
PREDICTIONS_0001 = sa.Table(
    "predictions", _v1, sa.Column("id", sa.Integer, primary_key=True), sa.Column("image_sha256", sa.String(64)),
    sa.Column("run_id", sa.Integer), sa.Column("model_id", sa.Text), sa.Column("topk", _JSON),
    sa.Column("created_at", sa.DateTime(timezone=True)),
)
T0 = datetime(2025, 3, 4, 5, 6, 7, tzinfo=timezone.utc)


def served_row(i: int, model: str = "a") -> dict:
    """A row as `imagerec serve` hands it to the recorder (serve/routes.py)."""
    return {"request_id": f"{i:032x}", "created_at": T0.isoformat(), "model": model, "version": "3",
            "model_path": f"/models/{model}", "sha256": f"{i:064x}", "name": f"{i}.png", "label": "7", "score": 0.9,
            "topk": [{"label": "7", "prob": 0.9}]}


# --- 1: served_as and request_id, and the upgrade from revision 0001 -----------------------------------
def test_a_store_at_revision_0001_upgrades_in_place_and_keeps_its_predictions(store_url: str) -> None:
    engine = create_store_engine(resolve_url(store_url))
    try:
        assert migrate(engine, "0001") == ["0001"]
        with engine.begin() as conn:
            conn.execute(sa.insert(RUNS_0001), {"id": 1, "name": "exp", "run_dir": "/runs/exp", "config": {}, "metrics": {},
                                                "versions": {}, "status": "completed", "started_at": T0})
            conn.execute(sa.insert(PREDICTIONS_0001), [
                {"image_sha256": "a" * 64, "run_id": 1, "model_id": "/runs/exp", "topk": [{"label": "cat", "prob": 0.5}],
                 "created_at": T0},
                {"image_sha256": "b" * 64, "run_id": None, "model_id": "m", "topk": [], "created_at": T0},
            ])
    finally:
        engine.dispose()
    with open_store(store_url) as store:  # the current code upgrades it
        assert current_revision(store.engine) == head_revision() == "0002"
        indexes = {ix["name"]: ix["column_names"] for ix in sa.inspect(store.engine).get_indexes("predictions")}
        assert indexes["ix_predictions_request_id"] == ["request_id"]
        old = list_predictions(store)
        assert [(r["id"], r["sha256"], r["run_id"], r["model_id"], r["topk"], r["created_at"]) for r in old] == [
            (1, "a" * 64, 1, "/runs/exp", [{"label": "cat", "prob": 0.5}], T0.isoformat()),
            (2, "b" * 64, None, "m", [], T0.isoformat()),
        ]
        assert {(r["served_as"], r["request_id"]) for r in old} == {(None, None)}
        assert record_predictions(store, "/runs/exp", [
            {"sha256": "c" * 64, "topk": [], "served_as": "exp@3", "request_id": "f" * 32},
            {"sha256": "d" * 64, "topk": []},  # both are optional
        ]) == 2
        (new,) = list_predictions(store, request_id="f" * 32)
        assert (new["id"], new["sha256"], new["run_id"], new["served_as"]) == (3, "c" * 64, 1, "exp@3")
        assert (list_predictions(store)[3]["served_as"], list_predictions(store)[3]["request_id"]) == (None, None)


@pytest.mark.parametrize("key, value, message", [
    ("request_id", "x" * 33, "request_id must be text of 1 to 32 characters"),
    ("request_id", "", "request_id must be text of 1 to 32 characters"),
    ("request_id", 12345, "request_id must be text of 1 to 32 characters .*; got 12345"),
    ("served_as", "", "served_as must be text like 'mnist@2' \\(name@version\\); got ''"),
    ("served_as", ["m", 2], "served_as must be text like 'mnist@2'"),
])
def test_bad_served_as_or_request_id_is_one_clear_error_and_writes_nothing(tmp_path: Path, key, value, message) -> None:
    with open_store(str(tmp_path / "s.db")) as store:
        with pytest.raises(ImageRecError, match=f"prediction row 2: {message}"):
            record_predictions(store, "m", [{"sha256": "a" * 64, "topk": []}, {"sha256": "b" * 64, "topk": [], key: value}])
        assert list_predictions(store) == []


# --- 2: a lock on the predictions table ------------------------------------------------------------------
@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_locked_table_fails_the_write_in_bounded_time_and_it_is_written_once_later(
        store_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """QA: with `LOCK TABLE predictions` held by another session the recorder's INSERT waited as long
    as the lock was held. It now fails after STORE_WRITE_TIMEOUT_S and its rows are written after the
    back-off, once the lock is gone: every row once, none dropped."""
    monkeypatch.setattr(recording, "STORE_WRITE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(recording, "RETRY_FIRST_S", 0.1)
    monkeypatch.setattr(recording, "RETRY_MAX_S", 0.2)
    caplog.set_level(logging.DEBUG, logger="imagerec.serve")
    open_store(store_url).close()  # created (migrated) before the lock is taken
    other = sa.create_engine(resolve_url(store_url))
    locker = other.connect()
    tx = locker.begin()
    locker.exec_driver_sql("LOCK TABLE predictions IN ACCESS EXCLUSIVE MODE")
    rec = recording.Recorder(ServeSettings(models=("x",), db=store_url), ServeMetrics())
    try:
        rec.record([served_row(0), served_row(1)])
        deadline = time.monotonic() + 10
        while "did not take 2 prediction(s) in time (canceling statement due to lock timeout)" not in caplog.text:
            assert time.monotonic() < deadline, "the write waited on the lock instead of failing"
            time.sleep(0.05)
        rec.record([served_row(2)])  # comes while the store is busy: written after the others
        while caplog.text.count("the store is still busy") < 2:  # tried again, and failed again
            assert time.monotonic() < deadline, "the rows were not tried again"
            time.sleep(0.05)
        assert rec.dropped == 0
    finally:
        tx.rollback()  # the lock is released
        locker.close()
    with other.connect() as conn:
        deadline = time.monotonic() + 10
        while conn.execute(sa.select(sa.func.count()).select_from(predictions)).scalar_one() < 3:
            assert time.monotonic() < deadline, "the rows were not written once the lock was released"
            time.sleep(0.05)
    rec.close()
    other.dispose()
    with open_store(store_url) as store:
        rows = list_predictions(store)
    assert [(r["request_id"], r["served_as"]) for r in rows] == [(f"{i:032x}", "a@3") for i in range(3)]  # once each
    assert rec.dropped == 0 and "the store takes predictions again" in caplog.text


def test_a_busy_write_is_tried_again_only_for_the_models_not_written_yet() -> None:
    """The hook writes one transaction per served model: when the second times out, the first is in
    the store and only the second and third are kept for the next try (else the first would be
    recorded twice)."""
    written: list[tuple[str, str]] = []
    fail = {"b"}

    def record(store: object, model_id: str, rows: list[dict], timeout_s: float) -> None:
        assert timeout_s == recording.STORE_WRITE_TIMEOUT_S
        if model_id.endswith(tuple(fail)):
            fail.clear()
            err = ImageRecError("the image store failed: canceling statement due to lock timeout")
            err.__cause__ = psycopg.errors.LockNotAvailable("canceling statement due to lock timeout")
            raise err
        written.extend((model_id, r["request_id"]) for r in rows)

    hook = recording.StoreHook("unused.db")
    hook.store, hook._record = object(), record
    rows = [served_row(0, "a"), served_row(1, "b"), served_row(2, "c"), served_row(3, "a")]
    with pytest.raises(recording.StoreBusy) as busy:
        hook(rows)
    assert [r["request_id"] for r in busy.value.rows] == [f"{i:032x}" for i in (1, 2)]
    assert busy.value.retry_in == recording.RETRY_FIRST_S
    hook(busy.value.rows)
    assert sorted(written) == sorted((f"/models/{r['model']}", r["request_id"]) for r in rows)  # each once


def test_a_store_error_that_is_not_a_timeout_is_not_retried() -> None:
    def record(store: object, model_id: str, rows: list[dict], timeout_s: float) -> None:
        raise ImageRecError("the image store failed: disk full")

    hook = recording.StoreHook("unused.db")
    hook.store, hook._record = object(), record
    with pytest.raises(ImageRecError, match="disk full"):
        hook([served_row(0)])


# --- 3: run ids no integer column can hold ---------------------------------------------------------------
def test_compare_runs_refuses_run_ids_the_store_cannot_hold(store_url: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """QA: the check was only in the CLI; the Python API failed with the database's own error."""
    too_big = 2**31 if store_url.startswith("postgresql") else 2**63  # runs.id: INTEGER
    with open_store(store_url) as store:
        run = record_run(store, tmp_path / "exp", {}, {"acc": 1.0}, {}, "completed")
        for bad in (too_big, -too_big - 1):
            with pytest.raises(ImageRecError, match=rf"^no run with id {bad} in the store .*; list them with: imagerec runs$"):
                compare_runs(store, [run, bad])
        with pytest.raises(ImageRecError, match=rf"^no run with id {too_big - 1} in the store"):
            compare_runs(store, [run, too_big - 1])  # the largest it can hold is looked up
    code = main(["runs", "--db", store_url, "--compare", str(run), str(too_big)])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "") and "Traceback" not in err
    assert err.strip().splitlines() == [f"error: no run with id {too_big} in the store {store.display_url}; "
                                        "list them with: imagerec runs"]
