"""Store fixtures: every store test runs on SQLite (a temp file) and on the real PostgreSQL server.

PostgreSQL: one fresh database per test session (created through the `test` database, dropped at
the end), one fresh schema per store inside it (the URL's search_path points there). When the
server is unreachable the PostgreSQL tests FAIL, unless IMAGEREC_SKIP_POSTGRES=1.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import sqlalchemy as sa
from store_helpers import CORRUPT_FILES, SourceFacts

from imagerec.data import read_data
from imagerec.store import ingest, open_store
from imagerec.store.ingest import array_png

PG_ADMIN_URL = os.environ.get("IMAGEREC_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgresql"]
CIFAR_PER_CLASS = 15  # JPEGs copied per (split, class) out of the real CIFAR-10 archive


@pytest.fixture(scope="session")
def pg_database(postgres_scratch: Callable[[str, str], AbstractContextManager[str]]) -> Iterator[str]:
    """Name of a fresh PostgreSQL database for this session."""
    name = f"imagerec_test_{secrets.token_hex(6)}"
    with postgres_scratch(f'CREATE DATABASE "{name}"', f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'):
        yield name


def new_store_url(backend: str, request: pytest.FixtureRequest, tmp: Path) -> str:
    """The URL of a new, empty store on `backend`."""
    if backend == "sqlite":
        return str(tmp / f"store-{secrets.token_hex(4)}.db")
    database = request.getfixturevalue("pg_database")
    schema = f"s_{secrets.token_hex(6)}"
    engine = sa.create_engine(sa.make_url(PG_ADMIN_URL).set(database=database), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    engine.dispose()
    return f"postgresql://postgres@127.0.0.1:5432/{database}?options=-csearch_path%3D{schema}"


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty store for one test, on each backend."""
    return new_store_url(request.param, request, tmp_path)


@pytest.fixture(scope="session")
def mnist_source() -> SourceFacts:
    spec = read_data("mnist-mini")
    items = {
        split: [
            (hashlib.sha256(array_png(spec.arrays[it.source.key][it.source.index])).hexdigest(), spec.class_names[it.target])
            for it in its
        ]
        for split, its in spec.splits.items()
    }
    return SourceFacts(spec, items)


@pytest.fixture(scope="session", params=BACKENDS)
def mnist_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, object]:
    """(url, report) of a store holding mnist-mini as dataset 'mnist', shared read-only by tests."""
    url = new_store_url(request.param, request, tmp_path_factory.mktemp("mnist-store"))
    with open_store(url) as store:
        report = ingest(store, "mnist-mini", "mnist", progress=False)
    return url, report


@pytest.fixture(scope="session")
def cifar_folder(shared_datasets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<split>/<class>/NNNN.jpg`: a few real CIFAR-10 JPEGs per class, plus two corrupt files."""
    root = tmp_path_factory.mktemp("cifar-jpg")
    taken: Counter[tuple[str, str]] = Counter()
    with tarfile.open(shared_datasets / "cifar10-jpg.tar.gz", "r|gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 4 or not parts[3].endswith(".jpg"):
                continue
            key = (parts[1], parts[2])
            if taken[key] >= CIFAR_PER_CLASS:
                continue
            f = tar.extractfile(member)
            assert f is not None
            dest = root / parts[1] / parts[2] / parts[3]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read())
            taken[key] += 1
            if len(taken) == 20 and all(n >= CIFAR_PER_CLASS for n in taken.values()):
                break
    assert len(taken) == 20, f"expected 2 splits x 10 classes in the archive, got {sorted(taken)}"
    first = next(iter(sorted((root / "train" / "cat").glob("*.jpg"))))
    (root / CORRUPT_FILES[0]).write_bytes(first.read_bytes()[:200])  # a JPEG cut short
    (root / CORRUPT_FILES[1]).write_bytes(b"this is a text file, not a JPEG\n" * 4)
    return root


@pytest.fixture(scope="session")
def cifar_source(cifar_folder: Path) -> SourceFacts:
    """The CIFAR folder as the reader lists it, without the corrupt files."""
    spec = read_data(str(cifar_folder))
    corrupt = {str(cifar_folder / c) for c in CORRUPT_FILES}
    items = {
        split: [
            (hashlib.sha256(Path(it.source).read_bytes()).hexdigest(), spec.class_names[it.target])
            for it in its
            if it.source not in corrupt
        ]
        for split, its in spec.splits.items()
    }
    return SourceFacts(spec, items)
