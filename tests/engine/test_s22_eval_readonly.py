"""`imagerec eval` of a run whose folder cannot be written (read-only, another user's): the numbers
are printed before anything is saved, the failure to save names the file and says what to do, and
`--out DIR` saves eval-<split>.json and confusion-<split>.png elsewhere.

A read-only folder is simulated by the `read_only_folder` fixture (tests/conftest.py)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from imagerec.cli import main


@pytest.fixture
def run(cnn_run: Path, copy_run: Callable[..., Path], tmp_path: Path) -> Path:
    return copy_run(cnn_run, tmp_path / "run")


@pytest.mark.parametrize("fmt", ["table", "json"])
def test_eval_of_a_read_only_run_prints_its_numbers_then_says_they_were_not_saved(
    run: Path, read_only_folder: Callable[[Path], None], capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    before = sorted(p.name for p in run.iterdir())
    read_only_folder(run)
    assert main(["eval", str(run), "--split", "val", "--format", fmt]) == 2
    out, err = capsys.readouterr()
    if fmt == "json":
        assert 0.5 < json.loads(out)["accuracy"] <= 1.0  # the result reached stdout whole
    else:
        assert "accuracy" in out.lower() and "written:" not in out
    assert f"cannot write {run}{os.sep}" in err and "Read-only file system" in err
    assert "the evaluation above was not saved" in err and "pass --out DIR" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in run.iterdir()) == before  # no temp file or half a pair left


def test_eval_out_saves_the_files_elsewhere_and_leaves_the_run_alone(
    run: Path, tmp_path: Path, read_only_folder: Callable[[Path], None], capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(p.name for p in run.iterdir())
    read_only_folder(run)
    out_dir = tmp_path / "reports" / "mnist"  # created, parents too
    assert main(["eval", str(run), "--split", "val", "--out", str(out_dir)]) == 0
    assert f"written: {out_dir / 'eval-val.json'}" in capsys.readouterr().out
    saved = json.loads((out_dir / "eval-val.json").read_text())
    assert saved["split"] == "val" and 0.5 < saved["accuracy"] <= 1.0
    assert (out_dir / "confusion-val.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in run.iterdir()) == before


def test_eval_out_that_cannot_be_a_folder_is_one_clear_line(run: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("x")
    assert main(["eval", str(run), "--split", "val", "--out", str(tmp_path / "afile" / "x")]) == 2
    err = capsys.readouterr().err
    assert f"cannot create --out {tmp_path / 'afile' / 'x'}: Not a directory" in err
    assert "Errno" not in err and "Traceback" not in err
