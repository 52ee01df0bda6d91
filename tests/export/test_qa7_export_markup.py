"""QA pass 7 (benchmark output): the table title names SOURCE as written. `[...]` in it was read as
Rich markup: `run[lr=0.1]` was shown as `run`, and `[/x]` raised MarkupError after the timing.

The run is one epoch of the small `cnn` on 24 real mnist-mini digits (a few seconds)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import imagerec
from imagerec.cli import main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qa7-bench") / "run"
    imagerec.train(data="mnist-mini", out=str(out), model="cnn", epochs=1, limit_train=24, batch_size=8,
                   augment="none", val_fraction=0.25, num_threads=1)
    return out


@pytest.mark.parametrize("folder", ["run[lr=0.1]", "[bold]run", "run[/x]"])
def test_benchmark_table_names_the_source_as_written(folder: str, tiny_run: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")  # the title on one line
    shutil.copytree(tiny_run, tmp_path / folder)
    capsys.readouterr()
    assert main(["benchmark", folder, "--batch-sizes", "1", "--seconds", "0.01"]) == 0
    out = capsys.readouterr().out
    assert f"inference speed: {folder}" in out, out
    assert "torch-fp32" in out, out
