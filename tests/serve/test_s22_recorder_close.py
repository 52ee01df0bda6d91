"""A server recording into SQLite closes the store at shutdown: SQLite folds the -wal file into the
store and removes -wal and -shm, so a stopped server leaves one file (copyable on its own) holding
every row, instead of the last rows sitting in a -wal beside it."""

from __future__ import annotations

from pathlib import Path

from conftest import served_row, wait_for

from imagerec.serve import recording
from imagerec.serve.settings import ServeSettings
from imagerec.store import list_predictions, open_store


def test_shutdown_leaves_one_store_file_with_every_row(tmp_path: Path) -> None:
    db = tmp_path / "preds.db"
    rec = recording.Recorder(ServeSettings(models=("x",), db=str(db)))
    rec.record([served_row(i) for i in range(3)])
    wait_for(lambda: rec._writing == 0 and not rec._rows, "the rows were not written")
    assert Path(f"{db}-wal").exists()  # the store is open in WAL mode while serving
    rec.close()
    assert not Path(f"{db}-wal").exists() and not Path(f"{db}-shm").exists()
    assert rec.hook.store is None
    with open_store(str(db)) as store:
        assert [r["request_id"] for r in list_predictions(store)] == [f"{i:032x}" for i in range(3)]
