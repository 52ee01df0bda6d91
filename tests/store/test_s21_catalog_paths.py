"""Session 21, serve QA bug 3: record_predictions / list_predictions key a run dir by its resolved path
(as training keys runs and `imagerec serve --db` records them), and compare sha256 in either case."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagerec.store import list_predictions, open_store, record_predictions, record_run
from imagerec.utils import ImageRecError

TOPK = [{"label": "7", "prob": 0.9}]


@pytest.fixture
def store_and_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "runs" / "exp1").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with open_store(str(tmp_path / "store.db")) as store:
        run_id = record_run(store, "runs/exp1", {}, {}, {}, "finished")
        yield store, run_id, str((tmp_path / "runs" / "exp1").resolve())


def test_a_run_dir_given_any_way_is_one_model_id_linked_to_its_run(store_and_run) -> None:
    store, run_id, absolute = store_and_run
    spellings = ["runs/exp1", "./runs/exp1", "runs/exp1/", absolute + "/", absolute]
    for i, model_id in enumerate(spellings):
        record_predictions(store, model_id, [{"sha256": f"{i:064x}", "topk": TOPK}])
    rows = list_predictions(store)
    assert [(r["model_id"], r["run_id"]) for r in rows] == [(absolute, run_id)] * len(spellings)
    for model_id in spellings:  # queried the way it was typed, or as serve recorded it
        assert len(list_predictions(store, model_id=model_id)) == len(spellings)


def test_a_model_name_that_is_no_path_is_kept_as_given(store_and_run) -> None:
    store, _, _ = store_and_run
    record_predictions(store, "mnist-prod", [{"sha256": "a" * 64, "topk": TOPK}])
    assert [(r["model_id"], r["run_id"]) for r in list_predictions(store, model_id="mnist-prod")] == [("mnist-prod", None)]


def test_sha256_is_compared_lower_cased_and_checked(store_and_run) -> None:
    store, _, _ = store_and_run
    record_predictions(store, "m", [{"sha256": "AB" * 32, "topk": TOPK}])
    assert [r["sha256"] for r in list_predictions(store, sha256="ab" * 32)] == ["ab" * 32]
    assert len(list_predictions(store, sha256="Ab" * 32)) == 1
    with pytest.raises(ImageRecError, match=r"list_predictions: sha256 must be 64 hex digits .*got 'xyz'"):
        list_predictions(store, sha256="xyz")
    with pytest.raises(ImageRecError, match=r"prediction row 1: sha256 must be 64 hex digits"):
        record_predictions(store, "m", [{"sha256": "z" * 64, "topk": TOPK}])
