"""`imagerec robustness` of a run whose folder cannot be written: the numbers are printed first,
then the failure to save them is one error line naming the file (not a lost measurement).

A read-only folder is simulated as in test_s22_eval_readonly (tests may run as root, which ignores
chmod): opening a file in it for writing fails with EROFS."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from imagerec.cli import main


@pytest.mark.parametrize("fmt", ["table", "json"])
def test_robustness_of_a_read_only_run_prints_its_numbers_then_says_they_were_not_saved(
    cnn_run: Path, copy_run: Callable[..., Path], tmp_path: Path, read_only_folder: Callable[[Path], None],
    capsys: pytest.CaptureFixture[str], fmt: str,
) -> None:
    run = copy_run(cnn_run, tmp_path / "run")
    before = sorted(p.name for p in run.iterdir())
    read_only_folder(run)
    code = main(["robustness", str(run), "--limit", "10", "--corruptions", "fog", "--severities", "1",
                 "--attacks", "none", "--format", fmt])
    out, err = capsys.readouterr()
    assert code == 2
    if fmt == "json":
        assert json.loads(out)["num_images"] == 10  # the whole result reached stdout
    else:
        assert "clean accuracy" in out and "fog" in out and "written:" not in out
    assert "the result above was not saved" in err and "robustness-test.json" in err and "Read-only" in err
    assert sorted(p.name for p in run.iterdir()) == before
