"""Session 21: resuming a checkpoint saved before `epochs_cap` was recorded, and the one warning a
resume gives when its data changed but its classes did not."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_qa7_train import StopInFirstStep

from imagerec.engine.run import train

TINY = {"epochs": 1, "batch_size": 4, "num_threads": 1, "workers": 0, "model": "mlp", "val_fraction": 0.0}


def _images(root: Path, n: int = 8) -> Path:
    """root/{a,b}/<i>.png: n 16x16 RGB noise images per class."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def test_resume_of_a_checkpoint_without_epochs_cap(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "r"
    opts = {**TINY, "epochs": 2, "time_limit": 0.02}
    assert train(data=str(_images(tmp_path / "g")), out=str(run), callbacks=[StopInFirstStep()], **opts).interrupted
    meta = json.loads((run / "last.json").read_text())
    assert (meta["state"]["planned"], meta.pop("epochs_cap")) == (False, 2)
    (run / "last.json").write_text(json.dumps(meta))  # as an imagerec before epochs_cap saved it
    shutil.copytree(run, tmp_path / "r2")
    with caplog.at_level(logging.WARNING, logger="imagerec"):
        result = train(resume=str(run))  # no KeyError: planned from the time left, no cap
    assert result.metrics["epochs_run"] >= 1
    assert _warnings(caplog, "epochs cap") == [
        f"--resume {run}: this checkpoint was saved before imagerec recorded the --epochs cap of a --time-limit run, "
        "so the epochs are planned from the time left, with no cap; if the run was given --epochs N, resume with "
        "--epochs N to keep it"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imagerec"):
        result = train(resume=str(tmp_path / "r2"), epochs=2)  # the remedy the warning names
    assert result.metrics["epochs_run"] == 2 and _warnings(caplog, "epochs cap") == []


def test_resume_with_changed_data_but_the_same_classes_warns_once(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    data, run = _images(tmp_path / "g"), tmp_path / "r"
    train(data=str(data), out=str(run), **TINY)
    shutil.copy(data / "a" / "0.png", data / "a" / "new.png")
    (data / "b" / "1.png").unlink()
    (data / "b" / "2.png").unlink()
    with caplog.at_level(logging.WARNING, logger="imagerec"):
        assert train(resume=str(run), epochs=2).metrics["epochs_run"] == 2
    assert _warnings(caplog, "changed") == [
        f"the data {data} changed since this run started (images per split: train 16 -> 15; training images per "
        "class: a 8 -> 9, b 8 -> 6); its classes are the same, so the run resumes, training on the data as it is now"]


def test_resume_with_renamed_files_says_the_counts_are_the_same(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    data, run = _images(tmp_path / "g"), tmp_path / "r"
    train(data=str(data), out=str(run), **TINY)
    (data / "a" / "0.png").rename(data / "a" / "zero.png")
    with caplog.at_level(logging.WARNING, logger="imagerec"):
        train(resume=str(run), epochs=2)
    assert _warnings(caplog, "changed") == [
        f"the data {data} changed since this run started (the same number of images per split and class, but other "
        "files or labels (replaced, renamed or relabelled)); its classes are the same, so the run resumes, training "
        "on the data as it is now"]
