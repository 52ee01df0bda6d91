"""Turning a store URL into a SQLAlchemy engine: URL defaults, SQLite pragmas, password masking.

This module imports nothing from the rest of imagerec but `utils`, so the decode path can use it
(through `blobref`) without an import cycle.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine

from imagerec.utils import ImageRecError

# Every command that opens a store takes --db; IMAGEREC_DB is its default. Hints name both, the flag first.
DB_FLAG = "--db (or IMAGEREC_DB)"
URL_HELP = (
    f"give {DB_FLAG} as a SQLite file path, sqlite:////abs/path/store.db, "
    "or postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
)
SQLITE_BUSY_TIMEOUT_MS = 60_000  # writers queue behind each other's batch transactions
PG_CONNECT_TIMEOUT_S = 10


def default_store_path() -> Path:
    """`$IMAGEREC_HOME/store.db`, else `~/.local/share/imagerec/store.db`."""
    home = os.environ.get("IMAGEREC_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".local" / "share" / "imagerec"
    return base / "store.db"


def mask_url(url: str | URL) -> str:
    """The URL as text with its password replaced by ***."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL: mask anything between ':' and '@' after the scheme
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def resolve_url(url: str | None = None) -> URL:
    """The store URL: `url`, else `$IMAGEREC_DB`, else the default SQLite file.

    A plain path (no `://`) is a SQLite file; `postgresql://` and `postgres://` use psycopg 3.
    """
    if not url:
        url = os.environ.get("IMAGEREC_DB") or str(default_store_path())
    if "://" not in url:
        return sa.URL.create("sqlite", database=str(Path(url).expanduser().resolve()))
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as e:
        raise ImageRecError(f"cannot parse the store URL {mask_url(url)} ({e}); {URL_HELP}") from e
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        return parsed
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:" or parsed.database.startswith("file:"):
            raise ImageRecError(
                f"the store URL {mask_url(parsed)} is not a SQLite file; the store must outlive the process "
                "(workers read from it): use sqlite:////abs/path/store.db"
            )
        return parsed.set(database=str(Path(parsed.database).expanduser().resolve()))
    raise ImageRecError(f"unsupported store URL {mask_url(parsed)} (backend '{backend}'); {URL_HELP}")


def _sqlite_events(engine: Engine) -> None:
    """WAL, foreign keys, and explicit BEGIN (IMMEDIATE for writers) instead of pysqlite's own.

    pysqlite's default BEGIN is deferred and emitted lazily: a transaction that reads and then
    writes can fail with SQLITE_BUSY at the write under concurrency, which no busy timeout fixes.
    Write transactions (`Store.write()`) take the write lock up front with BEGIN IMMEDIATE instead.
    """

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_connection.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode: a commit survives the process being killed, not a power cut.
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        write = conn.get_execution_options().get("imagerec_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _store_errors(engine: Engine) -> None:
    """Every query of `engine` that fails because of the store itself (a file damaged past its header,
    a read-only file, a full disk, a server gone) raises ImageRecError naming the store, instead of
    a traceback from whichever command ran it: this is the one place they are converted.

    Integrity errors (a duplicate row, a missing parent) are the callers' to handle and pass through,
    as do programming errors; pre-ping failures too, so the pool can reconnect."""

    @sa.event.listens_for(engine, "handle_error")
    def _on_error(ctx: sa.engine.ExceptionContext) -> None:
        exc = ctx.sqlalchemy_exception
        if ctx.is_pre_ping or not (isinstance(exc, sa.exc.OperationalError) or type(exc) is sa.exc.DatabaseError):
            return
        error = connect_error if ctx.connection is None else store_error
        raise error(engine.url, ctx.original_exception) from ctx.original_exception


def create_store_engine(url: URL) -> Engine:
    """A pooled engine for `url` (already resolved); SQLite files get their folder created."""
    backend = url.get_backend_name()
    if backend == "sqlite":
        path = Path(url.database or "")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ImageRecError(
                f"cannot create the folder for the store {path} ({e}): give {DB_FLAG} a store in a writable place, "
                "or set IMAGEREC_HOME to a writable folder"
            ) from e
        engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        _sqlite_events(engine)
        _store_errors(engine)
        return engine
    try:
        engine = sa.create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S})
    except (ImportError, sa.exc.NoSuchModuleError) as e:
        raise ImageRecError(
            f"cannot use the store URL {mask_url(url)}: its database driver is missing ({e}); "
            "install it with: pip install 'psycopg[binary]'"
        ) from e
    _store_errors(engine)
    return engine


def _detail(e: BaseException) -> str:
    """The first line of the database's own message."""
    return str(getattr(e, "orig", None) or e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _createdb(url: URL) -> str:
    """The `createdb` command that makes the database of the PostgreSQL `url` on its own server."""
    args = [f"-h {shlex.quote(url.host)}" if url.host else "", f"-p {url.port}" if url.port else "",
            f"-U {shlex.quote(url.username)}" if url.username else "", shlex.quote(url.database or "")]
    return " ".join(["createdb", *filter(None, args)])


def connect_error(url: URL, e: BaseException) -> ImageRecError:
    """A user-facing error for a store that cannot be opened."""
    detail = _detail(e)
    if url.get_backend_name() == "sqlite":
        hint = f"check that the file is a SQLite database and its folder is writable, or choose another with {DB_FLAG}"
    elif "does not exist" in detail and "database" in detail:
        hint = f"create it first ({_createdb(url)}), or give {DB_FLAG} an existing database"
    else:
        hint = "check that the server is running and reachable, and the user, password and database are right; " + URL_HELP
    return ImageRecError(f"cannot open the image store {mask_url(url)}: {detail}. {hint}")


def store_error(url: URL, e: BaseException) -> ImageRecError:
    """A user-facing error for a query on an open store that failed because of the store itself."""
    detail = _detail(e)
    low = detail.lower()
    if url.get_backend_name() != "sqlite":
        hint = "check that the server is running and reachable, and that the database has space left"
    elif "malformed" in low or "not a database" in low or "corrupt" in low:
        hint = f"the file is damaged: restore it from a backup, or ingest the data again into a new store given with {DB_FLAG}"
    elif "readonly" in low or "read-only" in low or "permission" in low:
        hint = ("make the file and its folder writable (SQLite also writes FILE-wal and FILE-shm beside it), "
                f"or choose another store with {DB_FLAG}")
    elif "disk i/o" in low or "full" in low or "space" in low:
        hint = f"the disk may be full (or a file size limit reached): free space where the store is, or choose another with {DB_FLAG}"
    elif "locked" in low or "busy" in low:
        hint = "another process held the store's write lock too long: try again when it has finished"
    else:
        hint = f"check the store file and its folder, or choose another store with {DB_FLAG}"
    return ImageRecError(f"the image store {mask_url(url)} failed: {detail}. {hint}")
