"""Session 21, bug 5: compare_runs given a run id that is not a whole number ("abc", "1.5", 1.5,
True) is the store's usual one-line error naming the value, not a bare ValueError or a silently
truncated id (1.5 compared run 1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from imagerec.cli import main
from imagerec.store import compare_runs, open_store, record_run
from imagerec.utils import ImageRecError


@pytest.mark.parametrize("bad", ["abc", "1.5", 1.5, True, None])
def test_compare_runs_refuses_a_run_id_that_is_not_a_whole_number(tmp_path: Path, bad: object) -> None:
    with open_store(str(tmp_path / "s.db")) as store:
        run = record_run(store, tmp_path / "exp", {}, {"acc": 1.0}, {}, "completed")
        assert run == 1
        with pytest.raises(ImageRecError) as info:
            compare_runs(store, [run, bad])  # type: ignore[list-item]
    assert str(info.value) == f"run id {bad!r} is not a whole number; list the runs and their ids with: imagerec runs"


def test_compare_runs_still_takes_integer_text_and_numpy_integers(tmp_path: Path) -> None:
    with open_store(str(tmp_path / "s.db")) as store:
        first = record_run(store, tmp_path / "a", {}, {"acc": 0.5}, {}, "completed")
        second = record_run(store, tmp_path / "b", {}, {"acc": 0.75}, {}, "completed")
        result = compare_runs(store, [str(second), np.int64(first), f" {second} "])
    assert [r["id"] for r in result["runs"]] == [second, first]
    assert result["metrics"]["acc"] == {second: 0.75, first: 0.5}


def test_runs_compare_cli_refuses_a_non_integer_id_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI's --compare is parsed as int: argparse names the value (usage error, exit 2)."""
    with pytest.raises(SystemExit) as info:
        main(["runs", "--db", str(tmp_path / "s.db"), "--compare", "1", "1.5"])
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == ""
    assert err.strip().splitlines()[-1].endswith("error: argument --compare: invalid int value: '1.5'")
