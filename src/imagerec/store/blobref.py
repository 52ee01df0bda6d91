"""`StoreBlob`: an item source that points at image bytes in the store, and `read_blob` to fetch them.

Loader workers are forked, and a pooled connection must never cross a fork, so engines are
cached per (process id, URL): each worker opens its own on first use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from imagerec.store.engine import connect_error, create_store_engine, resolve_url, store_error
from imagerec.store.schema import blobs


@dataclass(frozen=True)
class StoreBlob:
    """Image bytes with this sha256 in the store at `url` (the URL is kept out of repr: it may hold a password).
    `original_path` (where the image was ingested from) is for messages only: `str()`, which data
    fingerprints hash, is the content address alone."""

    url: str = field(repr=False)
    sha256: str
    original_path: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"store:{self.sha256}"


_ENGINES: dict[tuple[int, str], Engine] = {}


def _engine(url: str) -> Engine:
    key = (os.getpid(), url)
    engine = _ENGINES.get(key)
    if engine is None:
        for stale in [k for k in _ENGINES if k[0] != key[0]]:
            _ENGINES.pop(stale).dispose(close=False)  # inherited from the parent: leave its sockets alone
        engine = _ENGINES[key] = create_store_engine(resolve_url(url))
    return engine


def read_blob(src: StoreBlob) -> bytes:
    """The stored bytes of `src`; FileNotFoundError when the store has no such blob."""
    engine = _engine(src.url)
    try:
        with engine.connect() as conn:
            data = conn.execute(sa.select(blobs.c.data).where(blobs.c.sha256 == src.sha256)).scalar()
    except sa.exc.OperationalError as e:
        raise connect_error(engine.url, e) from e
    except sa.exc.SQLAlchemyError as e:  # e.g. the blobs table gone: the store, not this image
        raise store_error(engine.url, e) from e
    if data is None:
        raise FileNotFoundError(f"{src}: no such image in the store")
    return bytes(data)
