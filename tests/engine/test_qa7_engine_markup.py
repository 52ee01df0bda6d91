"""QA pass 7 (training output): the data's path, the run folder and unreadable files are printed as
written by `imagerec train`. `[...]` in them was read as Rich markup: DATA `imgs[lr=0.1]` was shown
as `imgs`, and `[/x]` raised MarkupError.

One epoch of the small `cnn` on 24 real mnist-mini digits written as PNGs (a few seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from imagerec.cli import main
from imagerec.data import read_data

CLASSES = ("[bold]cat", "dog[x]", "c[lr=0.1]")  # a name cannot hold '/': `[/x]` is in the paths below


def digit_folder(root: Path, n: int = 24) -> Path:
    """`root/<class>/<k>.png`: `n` real digits spread over CLASSES, and one broken PNG `bad[bold].png`."""
    spec = read_data("mnist-mini")
    for k, it in enumerate(spec.splits["test"][:n]):
        (root / CLASSES[k % 3]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(spec.arrays["test"][it.source.index]).save(root / CLASSES[k % 3] / f"{k}.png")
    (root / CLASSES[0] / "bad[bold].png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    return root


def test_training_prints_the_data_and_run_paths_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    digit_folder(tmp_path / "imgs[lr=0.1]" / "[bold]x[" / "y]")
    data = "imgs[lr=0.1]/[bold]x[/y]"
    code = main(["train", data, "--out", "run[/x]", "--epochs", "1", "--batch-size", "8", "--num-threads", "1"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "training cnn (" in err and f" params) on {tmp_path / data}: " in err, err
    assert "skipped 1 unreadable file(s); listed in run[/x]/metrics.json" in err, err

    code = main(["train", "--resume", "run[/x]"])  # nothing to train: says so, naming the run as written
    err = capsys.readouterr().err
    assert code == 0, err
    assert "run[/x] already finished after 1 epoch(s); raise --epochs to train further" in err, err
