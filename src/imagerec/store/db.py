"""Opening the store: resolve the URL, connect, bring the schema to the Alembic head."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy.engine import URL, Engine

from imagerec.store.engine import SQLITE_BUSY_TIMEOUT_MS, connect_error, create_store_engine, mask_url, resolve_url
from imagerec.utils import ImageRecError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_PG_MIGRATION_LOCK = 0x696D677265630001  # pg_advisory_xact_lock key: "imgrec" + 1
# The longest a PostgreSQL migration's statement waits for a table lock (SET LOCAL lock_timeout).
# An ALTER TABLE waits for every other session's lock on the table (a long query, a pg_dump, a LOCK
# TABLE) and, while it waits, blocks every new query on that table too: `imagerec serve --db`
# starting during a backup would hang and stall the store's other users. Past it the migration
# fails, changing nothing, with an error saying what to do.
MIGRATION_LOCK_TIMEOUT_S = 10.0
_PG_LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a lock_timeout


@dataclass
class Store:
    """An open image store. Use `with open_store() as store:` or call `close()`."""

    engine: Engine
    url: URL

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def url_text(self) -> str:
        """The full URL (with password) for handing to worker processes, never for printing."""
        return self.url.render_as_string(hide_password=False)

    @property
    def display_url(self) -> str:
        return mask_url(self.url)

    @contextmanager
    def read(self) -> Iterator[sa.Connection]:
        """A connection in a read transaction."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def write(self, timeout_s: float | None = None) -> Iterator[sa.Connection]:
        """A connection in a write transaction (SQLite: BEGIN IMMEDIATE); commits on success.

        `timeout_s`: for writers that must fail and try again later rather than wait behind
        someone's lock for as long as it is held. PostgreSQL: the longest a statement of this
        transaction may wait for a lock (SET LOCAL lock_timeout, so only this transaction), and
        twice that the longest it may run (statement_timeout: a server that stalls). SQLite: the
        longest BEGIN IMMEDIATE waits for another connection's write lock (busy_timeout, for this
        transaction only; else SQLITE_BUSY_TIMEOUT_MS), failing with "database is locked". Past it
        the statement fails and the transaction is rolled back: nothing of it is written.
        """
        ms = None if timeout_s is None else max(1, round(timeout_s * 1000))
        with self.engine.connect().execution_options(imagerec_write=True) as conn:
            sqlite_wait = ms is not None and self.dialect == "sqlite"
            if sqlite_wait:  # before BEGIN IMMEDIATE, which is where SQLite waits for the lock
                _sqlite_busy_timeout(conn, ms)
            try:
                with conn.begin():
                    if ms is not None and self.dialect == "postgresql":
                        conn.exec_driver_sql(f"SET LOCAL lock_timeout = {ms}")
                        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {2 * ms}")
                    yield conn
            finally:
                if sqlite_wait:  # the pooled connection goes back with the usual wait
                    _sqlite_busy_timeout(conn, SQLITE_BUSY_TIMEOUT_MS)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sqlite_busy_timeout(conn: sa.Connection, ms: int) -> None:
    """Set how long the SQLite connection under `conn` waits for a lock (on the driver's connection:
    a PRAGMA through SQLAlchemy would begin a transaction). One that fails is not reused."""
    try:
        conn.connection.driver_connection.execute(f"PRAGMA busy_timeout = {int(ms)}")  # type: ignore[union-attr]
    except sqlite3.Error:
        conn.invalidate()
        raise


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str:
    """The newest schema revision this version of imagerec knows."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def migrate(engine: Engine, revision: str | None = None) -> list[str]:
    """Upgrade the schema to head (or to `revision`, for tests of upgrades from an older store);
    return the revisions applied (empty when already current).

    All revisions run in one transaction that first takes a lock (PostgreSQL: an advisory lock;
    SQLite: BEGIN IMMEDIATE), so processes opening a new store at once migrate it exactly once.
    On PostgreSQL a revision waits at most MIGRATION_LOCK_TIMEOUT_S for another session's lock on a
    table it changes; past it nothing is changed and ImageRecError says which store and what to do.
    """
    target = revision or head_revision()
    before = current_revision(engine)
    if before == target:
        return []
    script = ScriptDirectory.from_config(_alembic_config())
    cfg = _alembic_config()
    try:
        with engine.connect().execution_options(imagerec_write=True) as conn, conn.begin():
            if engine.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
                # after the advisory lock: a process waiting for another's migration is not timed out
                conn.exec_driver_sql(f"SET LOCAL lock_timeout = {max(1, round(MIGRATION_LOCK_TIMEOUT_S * 1000))}")
            before = MigrationContext.configure(conn).get_current_revision()  # again, under the lock
            if before == target:
                return []
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, target)
    except ImageRecError as e:
        if getattr(getattr(e.__cause__, "orig", None) or e.__cause__, "sqlstate", None) != _PG_LOCK_NOT_AVAILABLE:
            raise
        raise _migration_locked(engine.url, before, target) from e
    except CommandError as e:
        raise ImageRecError(
            f"the store {mask_url(engine.url)} has schema revision {before}, which this imagerec does not know "
            f"(newest known: {head_revision()}); upgrade imagerec ({e})"
        ) from e
    applied = [rev.revision for rev in script.iterate_revisions(target, before)]
    return list(reversed(applied))


def _migration_locked(url: URL, before: str | None, target: str) -> ImageRecError:
    """The error for a PostgreSQL migration that another session's table lock held up too long."""
    return ImageRecError(
        f"cannot upgrade the store {mask_url(url)} from schema revision {before or '(none)'} to {target}: another "
        f"session held a lock on one of its tables for more than {MIGRATION_LOCK_TIMEOUT_S:g} s (a long query, "
        "a pg_dump, a LOCK TABLE); nothing was changed. Find it with: SELECT pid, state, query FROM pg_stat_activity "
        f"WHERE datname = '{url.database}' AND pid <> pg_backend_pid(); then start again once it has finished "
        "(or end it with SELECT pg_terminate_backend(PID))"
    )


def open_store(url: str | None = None) -> Store:
    """Open (creating and migrating if needed) the image store at `url`.

    `url` None means `$IMAGEREC_DB`, else the SQLite file `$IMAGEREC_HOME/store.db`, else
    `~/.local/share/imagerec/store.db`. A plain path is a SQLite file; `postgresql://...` uses
    psycopg 3. SQLite runs in WAL mode with foreign keys on.

    Example:
        >>> with open_store("/tmp/imagerec-doctest.db") as store:
        ...     store.dialect
        'sqlite'
    """
    resolved = resolve_url(url)
    engine = create_store_engine(resolved)
    try:
        migrate(engine)
    except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DatabaseError) as e:
        engine.dispose()
        raise connect_error(resolved, e) from e
    except BaseException:
        engine.dispose()
        raise
    return Store(engine, resolved)
