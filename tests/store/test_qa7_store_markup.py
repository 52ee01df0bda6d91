"""QA pass 7 (store commands): run names, data paths, class names and folders with `[...]` are printed
as written by `runs`, `runs --compare`, `datasets`, `ingest` and `export-dataset` (never read as Rich
markup: `cnn[lr=0.1]` was listed as `cnn`, and `[/x]` raised MarkupError); the hint for a PostgreSQL
database that does not exist names --db (or IMAGEREC_DB), as every other store hint does.

Runs on SQLite and the real PostgreSQL server (conftest.py); images are real mnist-mini digits."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from PIL import Image

from imagerec.cli import main
from imagerec.data import read_data
from imagerec.store import datasets_command, export_dataset_command, ingest_command, open_store, record_run, runs_command
from imagerec.utils import ImageRecError

CLASSES = ("[bold]cat", "dog[x]", "c[lr=0.1]")  # a name cannot hold '/': `[/x]` is in the paths below
NAMES = ("cnn[lr=0.1]", "[bold]big", "odd[/x]")


def cells(out: str) -> set[str]:
    """Every cell of the Rich tables in `out`, stripped."""
    return {c.strip() for line in out.splitlines() if line.count("│") >= 2 for c in line.split("│")[1:-1]}


def test_runs_list_and_compare_print_names_as_written(store_url: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with open_store(store_url) as store:
        ids = [record_run(store, tmp_path / f"run{k}", {"model": "cnn"}, {"model": f"m[/x]{k}", "test": {"accuracy": 0.5}},
                          {}, "completed", name=name, data_origin=f"/data/imgs[/x]{k}")
               for k, name in enumerate(NAMES)]
    assert runs_command(db=store_url) == 0
    got = cells(capsys.readouterr().out)
    assert set(NAMES) | {"m[/x]0", "/data/imgs[/x]1"} <= got, got
    assert runs_command(db=store_url, compare=ids) == 0
    out = capsys.readouterr().out
    assert all(f"{i}: {name}" in out for i, name in zip(ids, NAMES, strict=True)), out  # the column headers
    assert {"m[/x]0", "m[/x]1", "m[/x]2"} <= cells(out), out  # the row of each run's model


def test_ingest_datasets_and_export_print_classes_and_paths_as_written(store_url: str, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    spec = read_data("mnist-mini")
    source = tmp_path / "imgs[" / "x]"  # SOURCE `imgs[/x]`
    for k, it in enumerate(spec.splits["test"][:12]):
        (source / CLASSES[k % 3]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(spec.arrays["test"][it.source.index]).save(source / CLASSES[k % 3] / f"{k}[bold].png")
    db = str(tmp_path / "store[" / "x]" / "s.db") if "://" not in store_url else store_url
    assert ingest_command(str(source), "digits", db=db) == 0
    out = capsys.readouterr().out
    assert f"train on it with: imagerec train store:digits --db {db}" in out, out

    assert datasets_command(db=db) == 0
    out = capsys.readouterr().out
    assert "[bold]cat 4, c[lr=0.1] 4, dog[x] 4" in cells(out), out  # images per label, in class order

    dest = tmp_path / "out[" / "x]"
    assert export_dataset_command("digits", str(dest), db=db) == 0
    assert f"exported 12 images of 'digits' to {dest}" in capsys.readouterr().out
    assert sorted(p.name for p in dest.rglob("*.png")) and {p.parent.name for p in dest.rglob("*.png")} == set(CLASSES)


def test_a_missing_postgres_database_names_the_db_flag(request: pytest.FixtureRequest,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The real server answers 'database ... does not exist': the hint says how to create it on that
    server, or to give --db (or IMAGEREC_DB) an existing one (it said only IMAGEREC_DB)."""
    request.getfixturevalue("pg_database")  # the server is reachable (or the PostgreSQL tests are skipped)
    name = f"imagerec_missing_{secrets.token_hex(4)}"
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    with pytest.raises(ImageRecError) as e:
        open_store(url)
    assert f'database "{name}" does not exist' in str(e.value)
    assert str(e.value).endswith(f"create it first (createdb -h 127.0.0.1 -p 5432 -U postgres {name}), "
                                 "or give --db (or IMAGEREC_DB) an existing database"), e.value
    assert main(["runs", "--db", url]) == 2  # at the command line: that one line, no traceback
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "or give --db (or IMAGEREC_DB) an existing database" in err, err


def test_store_hints_name_the_db_flag_and_its_variable(tmp_path: Path) -> None:
    """Every hint that says to choose another store names --db first, then IMAGEREC_DB."""
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ImageRecError, match=r"give --db \(or IMAGEREC_DB\) a store in a writable place, or set IMAGEREC_HOME"):
        open_store(str(tmp_path / "file" / "s.db"))
    (tmp_path / "junk.db").write_bytes(b"this is not a SQLite database, not at all" * 100)
    with pytest.raises(ImageRecError, match=r"or choose another (store )?with --db \(or IMAGEREC_DB\)"):
        open_store(str(tmp_path / "junk.db"))
