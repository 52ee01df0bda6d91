"""Session 21, bug 3: upgrading a PostgreSQL store (revision 0001 -> 0002 ALTERs predictions) while
another session holds a lock on the table waited for as long as the lock was held (and, queued,
blocked every other query on the table). It now gives up after MIGRATION_LOCK_TIMEOUT_S, changing
nothing, with an error naming the store and what to do; `serve --db` logs it and tries again."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from imagerec.serve import recording
from imagerec.store import db as store_db
from imagerec.store import migrate, open_store
from imagerec.store.db import current_revision
from imagerec.store.engine import create_store_engine, resolve_url
from imagerec.utils import ImageRecError


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_migration_held_up_by_a_table_lock_fails_in_bounded_time_naming_the_store(
        store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_db, "MIGRATION_LOCK_TIMEOUT_S", 0.5)
    engine = create_store_engine(resolve_url(store_url))
    assert migrate(engine, "0001") == ["0001"]  # an older store
    database = engine.url.database
    other = sa.create_engine(resolve_url(store_url))
    locker = other.connect()
    tx = locker.begin()
    locker.exec_driver_sql("LOCK TABLE predictions IN ACCESS SHARE MODE")  # what a long SELECT or pg_dump holds
    outcome: list[BaseException | object] = []

    def upgrade() -> None:  # on a thread: a migration that waits on the lock fails the test, not hangs it
        try:
            outcome.append(open_store(store_url))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome.append(e)

    worker = threading.Thread(target=upgrade, daemon=True)
    try:
        worker.start()
        worker.join(5)
        assert not worker.is_alive(), "the migration waited on the lock"
        (error,) = outcome
        assert isinstance(error, ImageRecError), error
        message = str(error)
        assert message.startswith(f"cannot upgrade the store postgresql+psycopg://postgres@127.0.0.1:5432/{database}")
        assert "from schema revision 0001 to 0002: another session held a lock on one of its tables for more than 0.5 s" in message
        assert "nothing was changed" in message and f"WHERE datname = '{database}'" in message
        assert current_revision(engine) == "0001"

        hook = recording.StoreHook(store_url)  # serve --db: logged with the same advice, tried again later
        assert hook.open() is False
        assert hook.problem is not None and "cannot upgrade the store" in hook.problem
        assert "another session held a lock on one of its tables" in hook.problem
    finally:
        tx.rollback()
        locker.close()
        other.dispose()
        worker.join(10)
        for opened in outcome:
            if not isinstance(opened, BaseException):
                opened.close()  # type: ignore[attr-defined]
    with open_store(store_url) as store:  # the lock is gone: the upgrade goes through
        assert current_revision(store.engine) == "0002"
    engine.dispose()
