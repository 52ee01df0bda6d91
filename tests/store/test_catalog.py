"""Runs, predictions, and the CLI-facing command functions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from imagerec.store import (
    compare_runs,
    datasets_command,
    export_dataset_command,
    ingest_command,
    list_predictions,
    list_runs,
    open_store,
    record_predictions,
    record_run,
    runs_command,
)
from imagerec.utils import ImageRecError


def test_runs_are_recorded_updated_and_compared(store_url: str, tmp_path: Path) -> None:
    with open_store(store_url) as store:
        first = record_run(store, tmp_path / "exp1", {"model": "cnn", "lr": 0.1}, {}, {"torch": "2.4"}, "running",
                           data_origin="mnist-mini", data_fingerprint="ab" * 32)
        (run,) = list_runs(store)
        assert (run["id"], run["status"], run["finished_at"], run["name"]) == (first, "running", None, "exp1")
        metrics1 = {"test": {"accuracy": 0.97, "loss": 0.1}, "epochs": 3}
        assert record_run(store, tmp_path / "exp1", {"model": "cnn", "lr": 0.1}, metrics1, {"torch": "2.4"}, "completed") == first
        second = record_run(store, tmp_path / "exp2", {"model": "mlp"}, {"test": {"accuracy": 0.91}}, {}, "failed")
        runs = list_runs(store)
        assert [r["id"] for r in runs] == [first, second]
        assert runs[0]["status"] == "completed" and runs[0]["finished_at"] is not None
        assert runs[0]["metrics"] == metrics1 and runs[0]["config"] == {"model": "cnn", "lr": 0.1}
        assert runs[0]["data_origin"] == "mnist-mini"  # kept by the update that did not give it
        assert runs[0]["run_dir"] == str((tmp_path / "exp1").resolve())

        cmp = compare_runs(store, [second, first])
        assert [r["id"] for r in cmp["runs"]] == [second, first]
        assert cmp["metrics"]["test.accuracy"] == {second: 0.91, first: 0.97}
        assert cmp["metrics"]["test.loss"] == {second: None, first: 0.1}
        with pytest.raises(ImageRecError, match="no run with id 999"):
            compare_runs(store, [first, 999])


def test_an_evaluation_keeps_the_runs_status(store_url: str, tmp_path: Path) -> None:
    """`imagerec eval` records its results with the run, but does not mark an interrupted run completed."""
    from imagerec.store import record_run_dir

    run = tmp_path / "r"
    run.mkdir()
    (run / "last.json").write_text(json.dumps({"train_config": {"epochs": 3}, "data": {"origin": "mnist-mini"}}))
    (run / "eval-test.json").write_text(json.dumps({"accuracy": 0.5}))
    with open_store(store_url) as store:
        record_run_dir(store, run, "interrupted")
        finished = list_runs(store)[0]["finished_at"]
        record_run_dir(store, run, None)
        (got,) = list_runs(store)
        assert (got["status"], got["finished_at"]) == ("interrupted", finished)
        assert got["metrics"]["evals"]["test"]["accuracy"] == 0.5
        other = tmp_path / "never-recorded"  # evaluated before it was ever recorded: judged by its files
        other.mkdir()
        (other / "last.json").write_text((run / "last.json").read_text())
        record_run_dir(store, other, None)
        (other / "metrics.json").write_text("{}")
        done = tmp_path / "done"
        done.mkdir()
        (done / "last.json").write_text((run / "last.json").read_text())
        (done / "metrics.json").write_text("{}")
        record_run_dir(store, done, None)
        status = {r["name"]: r["status"] for r in list_runs(store)}
        assert (status["never-recorded"], status["done"]) == ("interrupted", "completed")


def test_a_recorded_run_starts_when_its_folder_was_first_written(store_url: str, tmp_path: Path) -> None:
    """`imagerec train` records a run once it has ended: its start is when config.yaml was written,
    not the moment of recording (which is its finish)."""
    import os
    from datetime import datetime

    from imagerec.store import record_run_dir

    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("epochs: 3\n")
    (run / "last.json").write_text(json.dumps({"train_config": {"epochs": 3}, "data": {"origin": "mnist-mini"}}))
    (run / "metrics.json").write_text("{}")
    start = datetime.now().timestamp() - 3600  # an hour of training
    os.utime(run / "config.yaml", (start, start))
    with open_store(store_url) as store:
        record_run_dir(store, run, "completed")
        (got,) = list_runs(store)
        started, finished = (datetime.fromisoformat(got[k]).timestamp() for k in ("started_at", "finished_at"))
        assert abs(started - start) < 1e-3 and finished - started > 3500
        (run / "eval-val.json").write_text(json.dumps({"accuracy": 0.5}))
        record_run_dir(store, run, None)  # a later evaluation keeps the start
        assert list_runs(store)[0]["started_at"] == got["started_at"]
        os.utime(run / "config.yaml")  # a --resume writes it again: the run still started with its first segment
        record_run_dir(store, run, "completed")
        assert list_runs(store)[0]["started_at"] == got["started_at"]


def test_predictions_by_sha256_or_path(store_url: str, tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(b"\x89PNG fake but hashable")
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    topk = [{"label": "cat", "prob": 0.9}, {"label": "dog", "prob": 0.1}]
    with open_store(store_url) as store:
        run_id = record_run(store, tmp_path / "r", {}, {}, {}, "completed")
        n = record_predictions(store, str(run_id), [{"path": str(image), "topk": topk}, {"sha256": "0" * 64, "topk": []}],
                               run_id=run_id)
        assert n == 2
        (row,) = list_predictions(store, sha256=sha)
        assert (row["model_id"], row["run_id"], row["topk"]) == (str(run_id), run_id, topk)
        assert len(list_predictions(store, model_id=str(run_id))) == 2
        with pytest.raises(ImageRecError, match="needs 'topk'"):
            record_predictions(store, "m", [{"sha256": sha}])


def test_command_functions(store_url: str, cifar_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert ingest_command(str(cifar_folder / "test"), "cifar-test", None, store_url) == 0
    out = capsys.readouterr().out
    assert "cifar-test: 150 added" in out and "not-an-image.jpg" in out and "store:cifar-test" in out

    assert datasets_command(store_url, "json") == 0
    listing = json.loads(capsys.readouterr().out)
    assert [(d["name"], d["splits"]) for d in listing["datasets"]] == [("cifar-test", {"train": 150})]
    assert "@" not in listing["store"] or "***" in listing["store"] or "postgres@" in listing["store"]
    assert datasets_command(store_url, "table") == 0
    assert "cifar-test" in capsys.readouterr().out

    with open_store(store_url) as store:
        a = record_run(store, tmp_path / "a", {}, {"test": {"accuracy": 0.5}}, {}, "completed")
        b = record_run(store, tmp_path / "b", {}, {"test": {"accuracy": 0.75}}, {}, "completed")
    assert runs_command(store_url, "json", [a, b]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["test.accuracy"] == {str(a): 0.5, str(b): 0.75}
    assert runs_command(store_url, "table", None) == 0
    table = capsys.readouterr().out
    assert "test.accuracy" in table and "0.7500" in table and "0.5000" in table
    with pytest.raises(ImageRecError, match="unknown format"):
        runs_command(store_url, "yaml", None)

    out_dir = tmp_path / "exported"
    assert export_dataset_command("cifar-test", str(out_dir), store_url) == 0
    assert len(list(out_dir.rglob("*.jpg"))) == 150
    with pytest.raises(ImageRecError, match="not an empty folder"):
        export_dataset_command("cifar-test", str(out_dir), store_url)

    junk = tmp_path / "junk" / "cls"
    junk.mkdir(parents=True)
    (junk / "a.jpg").write_bytes(b"not a jpeg")
    assert ingest_command(str(junk.parent), "junk", None, store_url) == 1  # nothing readable
