"""The run directory is claimed with a lock: two trainings never write one folder at once."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import pytest

from imagerec.engine.callbacks import Callback
from imagerec.engine.run import train
from imagerec.engine.run_dir import LOCK_FILE, claim_run_dir
from imagerec.utils import ImageRecError

SMALL = {"data": "mnist-mini", "limit_train": 256, "batch_size": 64, "model": "mlp", "epochs": 1}


class TrainAlongside(Callback):
    """Starts another `train(**kwargs)` while this run trains (at its start), and keeps what happened."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs, self.outcome = kwargs, None

    def on_fit_start(self, trainer) -> None:
        try:
            train(**self.kwargs)
            self.outcome = "it trained too"
        except ImageRecError as e:
            self.outcome = str(e)


def test_a_second_training_into_the_same_folder_is_refused(tmp_path: Path) -> None:
    """QA: two `train --out runs/same` at once both ran and both said "run saved"; the folder ended
    with one run's config.yaml and the other's checkpoints."""
    run = tmp_path / "same"
    busy = f"{run}: another process (pid {os.getpid()}) is training into this folder right now"
    second = TrainAlongside(**{**SMALL, "model": "cnn", "seed": 2, "out": str(run)})
    result = train(out=str(run), callbacks=[second], **SMALL)
    assert second.outcome is not None and second.outcome.startswith(busy), second.outcome
    assert result.metrics["epochs_run"] == 1 and "model: mlp\n" in (run / "config.yaml").read_text()
    assert not (run / LOCK_FILE).exists()  # released, and removed, at the end

    # --resume of a run that is being trained (here: resumed) is refused too
    second = TrainAlongside(resume=str(run))
    train(resume=str(run), epochs=2, callbacks=[second])
    assert second.outcome is not None and second.outcome.startswith(busy), second.outcome
    assert len((run / "history.csv").read_text().strip().splitlines()) == 3  # epochs 1 and 2, once each


def test_a_lock_file_left_by_a_killed_run_locks_nothing(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("model: mlp\n")  # a run killed before its first checkpoint
    (run / LOCK_FILE).write_text("12345\n")  # its lock file: the kernel dropped the lock itself
    train(out=str(run), **SMALL)
    (run / LOCK_FILE).write_text("12345\n")
    assert train(resume=str(run), epochs=2).metrics["epochs_run"] == 2
    assert not (run / LOCK_FILE).exists()


def test_default_out_takes_the_next_number_while_one_is_being_trained(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with contextlib.ExitStack() as first, contextlib.ExitStack() as second:
        assert claim_run_dir("runs/exp", first) == Path("runs/exp")
        assert claim_run_dir("runs/exp", second) == Path("runs/exp2")  # not the empty, claimed runs/exp
        with contextlib.ExitStack() as third, pytest.raises(ImageRecError, match="is training into this folder"):
            claim_run_dir("runs/exp2", third)  # named explicitly: refused
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["exp", "exp2"]
    assert not list((tmp_path / "runs").rglob(LOCK_FILE))


def test_out_refusals_come_before_the_data_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy or already used --out was refused only once the data had been read (minutes for a big
    dataset); the same refusals now come first, and the probe leaves the other run's lock alone."""
    import imagerec.engine.run as run_mod

    done = tmp_path / "done"
    train(out=str(done), **SMALL)
    read: list[str] = []

    def no_reading(data: str, *args: Any, **kwargs: Any) -> None:
        read.append(data)
        raise AssertionError("the data was read before --out was checked")

    monkeypatch.setattr(run_mod, "read_data", no_reading)
    with pytest.raises(ImageRecError, match=f"{done} already holds a run; continue it with --resume"):
        train(out=str(done), **SMALL)
    with contextlib.ExitStack() as held:  # a run training into `busy` (here: this process holds its lock)
        busy = claim_run_dir(str(tmp_path / "busy"), held)
        with pytest.raises(ImageRecError, match="is training into this folder right now"):
            train(out=str(busy), **SMALL)
        with contextlib.ExitStack() as other, pytest.raises(ImageRecError, match="is training into this folder"):
            claim_run_dir(str(busy), other)  # the probe took nothing: still locked
    (tmp_path / "file").write_text("x")
    with pytest.raises(ImageRecError, match="is a file; give a folder"):
        train(out=str(tmp_path / "file"), **SMALL)
    assert read == []
