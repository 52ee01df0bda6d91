"""QA pass 7: `imagerec serve --db` records which served version and which request made each
prediction (predictions.served_as, predictions.request_id), on SQLite and on the real PostgreSQL.

(Not named test_qa7_store.py: tests/store has one, and two test modules with one basename stop
pytest's collection of the whole suite: the test folders are not packages.)"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import start_thread_server

from imagerec.serve import ServeSettings
from imagerec.store import list_predictions, open_store


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new store: a SQLite file, or a fresh schema of the PostgreSQL `test` database (dropped after)."""
    if request.param == "sqlite":
        yield str(tmp_path / "store.db")
        return
    schema = f"s_{secrets.token_hex(6)}"
    scratch = request.getfixturevalue("postgres_scratch")  # tests/conftest.py
    with scratch(f"CREATE SCHEMA {schema}", f"DROP SCHEMA IF EXISTS {schema} CASCADE") as admin_url:
        url = sa.make_url(admin_url)
        yield f"postgresql://{url.username}@{url.host}:{url.port}/{url.database}?options=-csearch_path%3D{schema}"


def test_a_requests_id_finds_its_predictions_with_the_served_version(run_dir: Path, digits: list[bytes], db: str) -> None:
    """QA: the server answered each request with a request_id and X-Model-Version, and recorded
    neither: a stored prediction could not be traced to the request or the version that made it."""
    running = start_thread_server(ServeSettings(models=(f"mnist@7={run_dir}",), db=db))
    try:
        with running.client() as c:
            two = c.post("/v1/predict", files=[("file", ("a.png", digits[0], "image/png")),
                                               ("file", ("b.png", digits[1], "image/png"))])
            one = c.post("/v1/predict", files={"file": ("c.png", digits[2], "image/png")})
    finally:
        running.stop()  # the recorder is flushed on shutdown
    assert two.status_code == one.status_code == 200, (two.text, one.text)
    assert two.headers["x-model-version"] == "mnist@7"
    with open_store(db) as store:
        first = list_predictions(store, request_id=two.json()["request_id"])
        second = list_predictions(store, request_id=one.json()["request_id"])
        everything = list_predictions(store)
    assert [(r["sha256"], r["served_as"]) for r in first] == [(hashlib.sha256(d).hexdigest(), "mnist@7") for d in digits[:2]]
    assert [(r["sha256"], r["served_as"]) for r in second] == [(hashlib.sha256(digits[2]).hexdigest(), "mnist@7")]
    assert [r["topk"] for r in first] == [p["topk"] for p in two.json()["predictions"]]
    assert len(everything) == 3 and two.json()["request_id"] != one.json()["request_id"]
