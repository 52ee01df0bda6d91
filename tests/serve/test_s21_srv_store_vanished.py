"""Session 21, serve QA bug 1: a --db SQLite file deleted, moved or replaced while serving is noticed
before the next write: logged once as an error naming the file, and the path opened again as at startup
(a new store where none is), instead of every later row going into the unlinked file and being lost
while nothing said so. A path that cannot be opened again counts its rows as unrecorded."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from conftest import served_row, wait_for
from prometheus_client.parser import text_string_to_metric_families

from imagerec.serve import recording
from imagerec.serve.metrics import ServeMetrics
from imagerec.serve.settings import ServeSettings
from imagerec.store import list_predictions, open_store


def rows_in(db: str) -> list[str]:
    with open_store(db) as store:
        return [r["request_id"] for r in list_predictions(store)]


def unrecorded(metrics: ServeMetrics) -> float:
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    return families["imagerec_predictions_unrecorded"].samples[0].value


def idle(rec: recording.Recorder) -> bool:
    return rec._writing == 0 and not rec._rows


def remove_store(db: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(db + suffix).unlink(missing_ok=True)


def recorder_with_one_row(db: str) -> tuple[recording.Recorder, ServeMetrics]:
    """A recorder for the SQLite store `db` that has recorded row 0 (and is idle)."""
    metrics = ServeMetrics()
    rec = recording.Recorder(ServeSettings(models=("x",), db=db), metrics)
    rec.record([served_row(0)])
    wait_for(lambda: idle(rec) and rows_in(db) == [f"{0:032x}"], "row 0 was not recorded")
    return rec, metrics


def test_a_store_file_deleted_while_serving_is_created_again_and_said_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The repro: rm del.db del.db-wal del.db-shm while serving; the 5 later rows were lost, unsaid."""
    db = str(tmp_path / "del.db")
    with caplog.at_level(logging.WARNING, logger="imagerec.serve"):
        rec, metrics = recorder_with_one_row(db)
        remove_store(db)
        for i in range(1, 6):
            rec.record([served_row(i)])
            time.sleep(0.02)
        wait_for(lambda: idle(rec) and os.path.exists(db), "no store at the path again")
        rec.close()
    assert rows_in(db) == [f"{i:032x}" for i in range(1, 6)]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # once, not per row
    assert f"the store file given by --db, {db}, was deleted or moved away while serving" in errors[0]
    assert rec.dropped == 0 and unrecorded(metrics) == 0


def test_a_store_file_moved_without_its_wal_keeps_its_rows_and_the_later_ones_are_counted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Log rotation moves del.db and leaves del.db-wal/-shm, which the old file still uses: its rows go into
    it (a checkpoint), and no new store is made beside them: the rows are counted until they are removed."""
    monkeypatch.setattr(recording, "RETRY_FIRST_S", 0.1)
    monkeypatch.setattr(recording, "RETRY_MAX_S", 0.1)
    db, old = str(tmp_path / "del.db"), str(tmp_path / "old.db")
    metrics = ServeMetrics()
    rec = recording.Recorder(ServeSettings(models=("x",), db=db), metrics)
    with caplog.at_level(logging.WARNING, logger="imagerec.serve"):
        rec.record([served_row(0)])
        wait_for(lambda: idle(rec) and rec.hook.store is not None and len(list_predictions(rec.hook.store)) == 1,
                 "row 0 was not recorded")
        os.rename(db, old)
        rec.record([served_row(1), served_row(2)])
        wait_for(lambda: rec.dropped == 2, "the rows after the move were not counted as unrecorded")
        assert not os.path.exists(db)
        assert rows_in(old) == [f"{0:032x}"]  # checkpointed into the moved file, not left in del.db-wal
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 2
        assert f"the store file given by --db, {db}, was deleted or moved away while serving" in errors[0]
        assert errors[1].startswith(f"predictions are not recorded for now: {db}-wal and {db}-shm, left by the store")
        remove_store(db)  # the leftovers
        time.sleep(0.3)  # past the back-off: rows coming before it are counted too, as for any store not open
        rec.record([served_row(3)])
        wait_for(lambda: idle(rec) and os.path.exists(db) and rows_in(db) == [f"{3:032x}"], "not recorded again")
        rec.close()
    assert rec.dropped == 2 and unrecorded(metrics) == 2


def test_a_store_path_that_cannot_be_opened_again_counts_its_rows(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recording, "RETRY_FIRST_S", 30.0)  # no second try within the test
    db = str(tmp_path / "del.db")
    with caplog.at_level(logging.WARNING, logger="imagerec.serve"):
        rec, metrics = recorder_with_one_row(db)
        remove_store(db)
        os.mkdir(db)  # the path is now a folder: SQLite cannot open it
        rec.record([served_row(1), served_row(2)])
        wait_for(lambda: rec.dropped == 2, "the rows were not counted as unrecorded")
        rec.close()
    assert unrecorded(metrics) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and f"{db}, was replaced by another file while serving" in errors[0]
    assert "2 prediction(s) not recorded (2 so far)" in caplog.text
