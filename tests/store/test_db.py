"""Opening stores: URL resolution, SQLite pragmas, Alembic migrations, user-facing errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from imagerec.store import migrate, open_store
from imagerec.store.db import current_revision, head_revision
from imagerec.store.engine import create_store_engine, resolve_url
from imagerec.utils import ImageRecError

TABLES = {"alembic_version", "blobs", "datasets", "images", "predictions", "runs"}


def test_migrations_run_on_empty_db_then_are_a_noop(store_url: str) -> None:
    engine = create_store_engine(resolve_url(store_url))
    try:
        assert current_revision(engine) is None
        assert sa.inspect(engine).get_table_names() == []
        assert migrate(engine) == ["0001", "0002"]
        assert set(sa.inspect(engine).get_table_names()) == TABLES
        assert current_revision(engine) == head_revision() == "0002"
        uniques = {tuple(u["column_names"]) for u in sa.inspect(engine).get_unique_constraints("images")}
        assert ("dataset_id", "sha256") in uniques

        statements: list[str] = []
        sa.event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
        assert migrate(engine) == []
        assert not [s for s in statements if s.lstrip().upper().startswith(("CREATE", "ALTER", "DROP", "INSERT", "UPDATE"))]
    finally:
        engine.dispose()
    with open_store(store_url) as store:  # and open_store on a migrated store works as-is
        assert current_revision(store.engine) == "0002"


def test_sqlite_store_uses_wal_and_foreign_keys(tmp_path: Path) -> None:
    with open_store(str(tmp_path / "s.db")) as store, store.read() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    with pytest.raises(sa.exc.IntegrityError), open_store(str(tmp_path / "s.db")) as store, store.write() as conn:
        conn.exec_driver_sql(
            "INSERT INTO images (dataset_id, sha256, original_path, width, height, mode, format, labels, split) "
            "VALUES (42, 'nope', 'x', 1, 1, 'L', 'PNG', '[]', 'train')"
        )


def test_default_location_is_imagerec_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGEREC_DB", raising=False)
    monkeypatch.setenv("IMAGEREC_HOME", str(tmp_path / "home"))
    with open_store() as store:
        assert store.dialect == "sqlite"
        assert Path(store.url.database) == tmp_path / "home" / "store.db"
    assert (tmp_path / "home" / "store.db").is_file()
    monkeypatch.setenv("IMAGEREC_DB", f"sqlite:///{tmp_path / 'env.db'}")
    with open_store() as store:
        assert Path(store.url.database) == tmp_path / "env.db"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://alice:hunter2@127.0.0.1:1/imagerec", "postgresql+psycopg://alice:***@127.0.0.1:1/imagerec"),
        ("mysql://alice:hunter2@db.example/imagerec", "mysql://alice:***@db.example/imagerec"),
        ("sqlite://", "not a SQLite file"),
        ("postgresql://alice:hunter2@[bad", "alice:***@"),
    ],
)
def test_bad_or_unreachable_url_is_a_clear_error_without_the_password(url: str, expected: str) -> None:
    with pytest.raises(ImageRecError) as info:
        open_store(url)
    message = str(info.value)
    assert expected in message
    assert "hunter2" not in message
    assert "IMAGEREC_DB" in message or "sqlite:////" in message


def test_unreachable_server_says_what_to_do() -> None:
    with pytest.raises(ImageRecError, match=r"127\.0\.0\.1:1/imagerec.*check that the server is running"):
        open_store("postgresql://alice:hunter2@127.0.0.1:1/imagerec")


def _damage_middle(path: Path) -> None:
    """Overwrite 500 bytes in each 4 KB page of 200 KB in the middle of a SQLite file (its header intact)."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for offset in range(size // 2, size // 2 + 200_000, 4096):
            f.seek(offset + 100)
            f.write(b"\xab" * 500)


@pytest.mark.parametrize("mnist_store", ["sqlite"], indirect=True)
def test_a_store_damaged_past_its_header_is_one_clean_error_in_every_command(
    mnist_store: tuple[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The queries after open_store fail too: the engine turns every such failure into one ImageRecError."""
    import shutil

    from imagerec.cli import main as cli_main

    url, _ = mnist_store
    with open_store(url):  # closing the last connection folds the WAL into the file
        pass
    damaged = tmp_path / "damaged.db"
    shutil.copy(url, damaged)
    _damage_middle(damaged)
    for command in (["datasets"], ["ingest", "mnist-mini", "--dataset", "y"], ["check", "store:mnist"],
                    ["export-dataset", "mnist", str(tmp_path / "out")],
                    ["train", "store:mnist", "--out", str(tmp_path / "run"), "--epochs", "1"]):
        assert cli_main([*command, "--db", str(damaged)]) == 2, command
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err, err
        assert err.splitlines()[-1].startswith(f"error: the image store sqlite:///{damaged} failed: database disk "
                                               "image is malformed. the file is damaged: restore it from a backup"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.db"]  # no export or run folder left


def test_a_full_disk_fails_ingest_in_one_line_naming_the_store(tmp_path: Path) -> None:
    import subprocess
    import sys
    import textwrap

    db = tmp_path / "full.db"
    with open_store(str(db)):
        pass
    limit = db.stat().st_size + 64 * 1024  # room for a batch or two of the 7000 digits, not all of them
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from imagerec.cli import main
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        sys.exit(main(["ingest", "mnist-mini", "--dataset", "m", "--db", {str(db)!r}]))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert f"error: the image store sqlite:///{db} failed: disk I/O error. the disk may be full" in res.stderr
    with open_store(str(db)) as store, store.read() as conn:  # whole batches only, still a sound store
        assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
        assert conn.exec_driver_sql("SELECT count(*) FROM images").scalar() % 500 == 0  # ingest's batch size
