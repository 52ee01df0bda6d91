"""The store and doctor subcommands through the real CLI: ingest -> train store:NAME -> runs,
datasets, export-dataset; check with JSON output and quarantine/undo."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from imagerec.data import read_data


def cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imagerec.cli", *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_ingest_train_runs_datasets_export(tmp_path: Path) -> None:
    env = dict(os.environ, IMAGEREC_DB=str(tmp_path / "store.db"))
    folder = tmp_path / "digits"
    spec = read_data("mnist-mini")
    for split in ("train", "test"):
        for k, it in enumerate(spec.splits[split][:: 10 if split == "train" else 5]):
            d = folder / split / spec.class_names[it.target]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(spec.arrays[split][it.source.index]).save(d / f"{k}.png")
    (folder / "train" / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    r = cli("ingest", str(folder), "--dataset", "digits", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "800 added" in r.stdout and "1 unreadable" in r.stdout
    again = cli("ingest", str(folder), "--dataset", "digits", cwd=tmp_path, env=env)
    assert "0 added, 800 already stored" in again.stdout

    ds = json.loads(cli("datasets", "--format", "json", cwd=tmp_path, env=env).stdout)
    row = next(d for d in ds["datasets"] if d["name"] == "digits")
    assert row["images"] == 800 and row["splits"] == {"train": 600, "test": 200}
    table = cli("datasets", cwd=tmp_path, env={**env, "COLUMNS": "400"}).stdout  # README: counts per split and label
    labels = row["labels"]
    assert f"0 {labels['0']}, 1 {labels['1']}," in table and "... (2 more" in table, table

    t = cli("train", "store:digits", "--out", "run", "--epochs", "5", cwd=tmp_path, env=env)
    assert t.returncode == 0, t.stderr
    assert cli("eval", "run", "--format", "json", cwd=tmp_path, env=env).returncode == 0
    runs = json.loads(cli("runs", "--format", "json", cwd=tmp_path, env=env).stdout)["runs"]
    run = next(x for x in runs if x["name"] == "run")
    assert run["status"] == "completed" and run["data_origin"] == "store:digits"
    assert run["metrics"]["test"]["accuracy"] > 0.5
    assert run["metrics"]["evals"]["test"]["accuracy"] == run["metrics"]["test"]["accuracy"]

    out = tmp_path / "exported"
    e = cli("export-dataset", "store:digits", str(out), cwd=tmp_path, env=env)
    assert e.returncode == 0, e.stderr
    src = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.png") if p.name != "broken.png")
    dst = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*.png"))
    assert src == dst  # byte-identical images back


def test_check_json_quarantine_and_undo(tmp_path: Path) -> None:
    env = dict(os.environ)
    data = tmp_path / "pets"
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (data / cls).mkdir(parents=True)
        for k in range(6):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(data / cls / f"{k}.png")
    (data / "cat" / "empty.jpg").write_bytes(b"")
    (data / "dog" / "text.jpg").write_text("not an image")
    r = cli("check", str(data), "--format", "json", cwd=tmp_path, env=env)
    assert r.returncode == 1  # error-severity problems found
    report = json.loads(r.stdout)
    found = {(Path(p["path"]).name, p["category"]) for p in report["problems"]}
    assert ("empty.jpg", "zero_byte") in found and ("text.jpg", "not_an_image") in found
    assert "Traceback" not in r.stderr

    q = cli("check", str(data), "--fix", "quarantine", str(tmp_path / "q"), cwd=tmp_path, env=env)
    assert not (data / "cat" / "empty.jpg").exists() and (tmp_path / "q" / "quarantine-manifest.json").is_file()
    assert cli("check", str(data), "--format", "json", cwd=tmp_path, env=env).returncode == 0, q.stdout
    u = cli("check", "--undo", str(tmp_path / "q" / "quarantine-manifest.json"), cwd=tmp_path, env=env)
    assert u.returncode == 0, u.stderr
    assert (data / "dog" / "text.jpg").read_text() == "not an image"

    bad = cli("check", str(data), "--fix", "delete", "x", cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "error: unknown --fix action 'delete'" in bad.stderr


def write_digit_splits(folder: Path, per_split: int) -> Path:
    """`per_split` mnist-mini digits each of train and test as PNGs in FOLDER/<split>/<label>/."""
    spec = read_data("mnist-mini")
    for split in ("train", "test"):
        for k, it in enumerate(spec.splits[split][:per_split]):
            d = folder / split / spec.class_names[it.target]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(spec.arrays[split][it.source.index]).save(d / f"{k}.png")
    return folder


def test_db_flag_is_where_store_data_is_read_from(tmp_path: Path) -> None:
    """`--db URL` names the store a `store:NAME` DATA comes from, not only where records go: with
    the default store empty, train/eval/check/predict read the dataset from the --db store."""
    env = {k: v for k, v in os.environ.items() if k != "IMAGEREC_DB"} | {"IMAGEREC_HOME": str(tmp_path / "home")}
    team = str(tmp_path / "team.db")
    folder = write_digit_splits(tmp_path / "digits", 200)
    r = cli("ingest", str(folder), "--dataset", "digits", "--db", team, cwd=tmp_path, env=env)
    assert r.returncode == 0 and "400 added" in r.stdout, r.stderr
    assert f"train on it with: imagerec train store:digits --db {team}" in r.stdout

    t = cli("train", "store:digits", "--db", team, "--out", "run", "--epochs", "1", cwd=tmp_path, env=env)
    assert t.returncode == 0, t.stderr
    assert "store:digits: 181 train / 19 val images, 10 classes" in t.stderr
    e = cli("eval", "run", "--db", team, "--split", "VAL", "--format", "json", cwd=tmp_path, env=env)
    assert e.returncode == 0 and json.loads(e.stdout)["split"] == "val", e.stderr
    c = cli("check", "store:digits", "--db", team, "--format", "json", cwd=tmp_path, env=env)
    assert json.loads(c.stdout)["summary"]["images"] == {"train": 200, "test": 200}, c.stderr
    p = cli("predict", "run", "store:digits", "--db", team, "--format", "json", cwd=tmp_path, env=env)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 400, p.stderr[-500:]
    # the default store does not have it, and says so
    d = cli("train", "store:digits", "--out", "run2", "--epochs", "1", cwd=tmp_path, env=env)
    assert d.returncode == 2 and "no dataset 'digits'" in d.stderr


def test_one_class_is_refused_by_train_and_reported_by_check(tmp_path: Path) -> None:
    spec = read_data("mnist-mini")
    root = tmp_path / "photos"
    for k, it in enumerate(spec.splits["train"][:8]):
        (root / "cat").mkdir(parents=True, exist_ok=True)
        Image.fromarray(spec.arrays["train"][it.source.index]).save(root / "cat" / f"{k}.png")
    t = cli("train", str(root), "--out", "run", "--epochs", "1", cwd=tmp_path, env=dict(os.environ))
    assert t.returncode == 2
    assert "1 class(es) found ('cat'); a classifier needs at least 2" in t.stderr
    c = cli("check", str(root), "--format", "json", cwd=tmp_path, env=dict(os.environ))
    problems = json.loads(c.stdout)["problems"]
    assert c.returncode == 1 and [p["category"] for p in problems if p["severity"] == "error"] == ["single_class"]


def test_check_refuses_a_pixel_limit_below_one(tmp_path: Path) -> None:
    r = cli("check", "mnist-mini", "--max-pixels", "0", cwd=tmp_path, env=dict(os.environ))
    assert r.returncode == 2 and r.stderr.strip() == "error: max_pixels must be at least 1, got 0", r.stderr


def test_a_read_only_store_fails_ingest_in_one_line_and_never_a_finished_run(tmp_path: Path) -> None:
    """A store that cannot be written: ingest says so in one line; train and eval warn and finish (exit 0)."""
    import pytest

    from imagerec.store import open_store

    db = tmp_path / "ro.db"
    with open_store(str(db)):
        pass
    folder = write_digit_splits(tmp_path / "digits", 60)
    # we run as root, which writes through permission bits: the immutable flag stops root too
    if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here, and as root a chmod 444 store stays writable")
    try:
        env = dict(os.environ, IMAGEREC_DB=str(db), OMP_NUM_THREADS="1")
        problem = f"the image store sqlite:///{db} failed: attempt to write a readonly database. make the file"
        i = cli("ingest", str(folder), "--dataset", "d", cwd=tmp_path, env=env)
        assert i.returncode == 2 and "Traceback" not in i.stderr, i.stderr[-2000:]
        assert f"error: {problem}" in i.stderr.splitlines()[-1]
        t = cli("train", str(folder), "--out", "run", "--epochs", "1", "--model", "mlp", cwd=tmp_path, env=env)
        assert t.returncode == 0 and "Traceback" not in t.stderr, t.stderr[-2000:]
        assert f"WARNING: run not recorded in the store: {problem}" in t.stderr
        assert "run saved in run" in t.stdout and "test: accuracy" in t.stdout  # the summary is printed
        e = cli("eval", "run", "--format", "json", cwd=tmp_path, env=env)
        assert e.returncode == 0 and json.loads(e.stdout)["split"] == "test", e.stderr[-2000:]
        assert f"WARNING: run not recorded in the store: {problem}" in e.stderr
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=True)


def test_recording_a_finished_run_never_fails_it_whatever_the_store_raises(tmp_path: Path, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    import logging

    import sqlalchemy as sa

    import imagerec.store
    from imagerec.cli import _record

    def refused(*args: object) -> None:
        raise sa.exc.IntegrityError("INSERT INTO runs ...", {}, Exception("UNIQUE constraint failed: runs.name"))

    monkeypatch.setattr(imagerec.store, "record_run_dir", refused)
    with caplog.at_level(logging.WARNING, logger="imagerec"):
        _record(tmp_path, "completed", str(tmp_path / "store.db"))  # returns: the run stays finished
    assert "run not recorded in the store: (builtins.Exception) UNIQUE constraint failed: runs.name" in caplog.text
    assert "INSERT INTO" not in caplog.text  # one line, not the SQL
