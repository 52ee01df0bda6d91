"""QA pass 7 (train): resume after the data's classes changed, val/test splits none of whose images
decode, a resumed --time-limit run keeping its --epochs cap, honest image counts when streaming."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from imagerec.engine.callbacks import Callback
from imagerec.engine.run import train
from imagerec.store import ingest, open_store
from imagerec.utils import ImageRecError

TINY = {"epochs": 1, "batch_size": 4, "num_threads": 1, "workers": 0, "model": "mlp", "val_fraction": 0.0}


def _images(root: Path, classes: tuple[str, ...] = ("a", "b"), n: int = 8, seed: int = 0) -> Path:
    """root/<class>/<i>.png: n 16x16 RGB noise images per class."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _unreadable(folder: Path, names: tuple[str, ...] = ("a", "b")) -> None:
    """One zero-byte .png per class folder under `folder`."""
    for c in names:
        (folder / c).mkdir(parents=True, exist_ok=True)
        (folder / c / "bad.png").write_bytes(b"")


# --- T1 bug 1: --resume after the data's classes changed ------------------------------------------

@pytest.mark.parametrize("change, expected", [
    ("add", r"added: '0new'"),
    ("rename", r"added: 'z'; removed: 'a' \(renamed 'a' to 'z'\?\)"),
], ids=["add", "rename"])
def test_resume_refuses_changed_classes(tmp_path: Path, change: str, expected: str) -> None:
    data = _images(tmp_path / "g")
    train(data=str(data), out=str(tmp_path / "r"), **TINY)
    if change == "add":  # sorts first: every old class index moves
        shutil.copytree(data / "a", data / "0new")
    else:
        (data / "a").rename(data / "z")
    with pytest.raises(ImageRecError, match=rf"classes of .* changed since this run started \({expected}") as e:
        train(resume=str(tmp_path / "r"), epochs=2)
    assert "'a', 'b', in that order" in str(e.value)
    assert json.loads((tmp_path / "r" / "last.json").read_text())["state"]["epoch"] == 1  # nothing trained on


def test_resume_refuses_a_class_added_to_a_store_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = str(tmp_path / "store.db")
    monkeypatch.setenv("IMAGEREC_DB", url)
    with open_store(url) as store:
        ingest(store, str(_images(tmp_path / "g")), "pets", progress=False)
    train(data="store:pets", out=str(tmp_path / "r"), **TINY)
    with open_store(url) as store:  # the dataset's class names grow: ['a', 'b', 'c']
        ingest(store, str(_images(tmp_path / "more", ("c",), seed=1)), "pets", progress=False)
    with pytest.raises(ImageRecError, match=r"classes of store:pets changed since this run started \(added: 'c'\)"):
        train(resume=str(tmp_path / "r"), epochs=2)


# --- T1 bug 4: resuming a --time-limit run keeps its explicit --epochs cap ------------------------

class StopInFirstStep(Callback):
    """Ctrl-C (a real SIGINT) during the first step: the run saves `last` before it planned its epochs."""

    def on_fit_start(self, trainer) -> None:
        def forward(module, args, output) -> None:
            if module.training and trainer.state.global_step == 0:
                os.kill(os.getpid(), signal.SIGINT)

        self.hook = trainer.model.register_forward_hook(forward)

    def on_fit_end(self, trainer) -> None:
        self.hook.remove()


def test_resumed_time_limit_run_keeps_its_epochs_cap(tmp_path: Path) -> None:
    data, run = _images(tmp_path / "g"), tmp_path / "r"
    # 6 s hold hundreds of these epochs: only the cap keeps the plan at 2
    opts = {**TINY, "epochs": 2, "time_limit": 0.1}
    assert train(data=str(data), out=str(run), callbacks=[StopInFirstStep()], **opts).interrupted
    saved = json.loads((run / "last.json").read_text())
    assert (saved["state"]["planned"], saved["train_config"]["epochs"], saved["epochs_cap"]) == (False, 2, 2)
    result = train(resume=str(run))
    assert result.metrics["epochs_run"] == 2
    assert json.loads((run / "last.json").read_text())["train_config"]["epochs"] == 2


# --- T1 bug 3: a val or test split none of whose images decode ------------------------------------

@pytest.mark.parametrize("cache", ["ram", "none"])
def test_early_stopping_refused_when_no_val_image_decodes(tmp_path: Path, cache: str) -> None:
    data = tmp_path / "d"
    _images(data / "train")
    _unreadable(data / "val")
    with pytest.raises(ImageRecError, match=r"^--early-stopping 1 watches the validation images, but none of the 2 'val' "
                                            r"images of .* could be read .*leave out --early-stopping$"):
        train(data=str(data), out=str(tmp_path / "r"), **{**TINY, "epochs": 2, "early_stopping": 1, "cache": cache})
    assert not (tmp_path / "r" / "last.json").exists()


@pytest.mark.parametrize("cache", ["ram", "none"])
def test_splits_with_no_readable_image_are_not_evaluated(tmp_path: Path, cache: str) -> None:
    data, run = tmp_path / "d", tmp_path / "r"
    _images(data / "train")
    _unreadable(data / "val")
    _unreadable(data / "test")
    result = train(data=str(data), out=str(run), **{**TINY, "epochs": 2, "cache": cache})
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == result.metrics | {"checkpoints": metrics["checkpoints"]}
    assert sorted(metrics["not_evaluated"]) == ["test", "val"]
    assert "none of the 2 'test' images" in metrics["not_evaluated"]["test"]
    assert "val" not in metrics and "test" not in metrics and not list(run.glob("eval-*.json"))
    assert len(metrics["skipped_files"]) == 4
    assert (metrics["epochs_run"], metrics["best_epoch"]) == (2, 2)  # no val metric: the last epoch is the best


# --- T1 bug 7: streamed (--cache none) image counts leave out unreadable files ----------------------

@pytest.mark.parametrize("cache", ["ram", "none"])
def test_train_images_counts_only_readable_files(tmp_path: Path, cache: str) -> None:
    data = _images(tmp_path / "c")
    (data / "a" / "zero.png").write_bytes(b"")
    (data / "a" / "text.jpg").write_text("hi")
    (data / "b" / "trunc.png").write_bytes((data / "b" / "0.png").read_bytes()[:100])
    out = io.StringIO()
    # one batch holds all 19 listed images, so a streamed epoch meets each bad file
    result = train(data=str(data), out=str(tmp_path / "r"), console=Console(file=out, width=400),
                   **{**TINY, "batch_size": 32, "cache": cache})
    assert result.metrics["train_images"] == 16
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["train_images"] == 16
    header = next(line for line in out.getvalue().splitlines() if line.startswith("training "))
    assert ("19 listed train / 0 val images (listed: a streamed image" if cache == "none" else "16 train / 0 val images,") in header
