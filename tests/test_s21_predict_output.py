"""Session 21 (QA "sec" bug 1): `predict --output FILE` never replaces a file that is not predictions:
not one of the inputs (the image being predicted, also through a link), not a user's other file.
An earlier prediction file of the same format is still replaced, and --resume still appends to it.

A tiny untrained `mlp` run is written straight to a checkpoint, so these tests train nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagerec import predict_run
from imagerec.predict_run import run_predict
from imagerec.utils import ImageRecError

FORMATS = ["table", "json", "csv", "parquet"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, untrained_run) -> Path:
    return untrained_run(tmp_path_factory.mktemp("s21-run"))


def _png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return path


def _no_model(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise AssertionError("the model was loaded (and images predicted) before --output was checked")


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_input_image_is_never_the_output(tiny_run: Path, tmp_path: Path, fmt: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    photo = _png(tmp_path / "photos" / "photo.png", 0)
    other = _png(tmp_path / "photos" / "other.png", 1)
    before = photo.read_bytes()
    (tmp_path / "link.png").symlink_to(photo)
    monkeypatch.setattr(predict_run, "load", _no_model)
    for inputs in ([photo], [other, tmp_path / "link.png"], [tmp_path / "photos"]):  # as given, by a link, in a folder
        with pytest.raises(ImageRecError, match=r"--output .*photo.png is one of the inputs \(.*\.png\)"):
            run_predict(str(tiny_run), [str(p) for p in inputs], fmt=fmt, output=str(photo))
        assert photo.read_bytes() == before
    with pytest.raises(ImageRecError, match="is one of the inputs"):  # --resume too
        run_predict(str(tiny_run), [str(photo)], fmt=fmt if fmt != "table" else "json", output=str(photo), resume=True)
    assert photo.read_bytes() == before


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_existing_file_that_is_not_predictions_is_refused(tiny_run: Path, tmp_path: Path, fmt: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    photo = _png(tmp_path / "photo.png", 0)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    image = _png(tmp_path / "elsewhere" / "cat.png", 2)  # an image that is not an input
    monkeypatch.setattr(predict_run, "load", _no_model)
    kind = "prediction table" if fmt == "table" else f"{fmt} prediction file"
    for victim in (notes, image):
        before = victim.read_bytes()
        with pytest.raises(ImageRecError, match=rf"--output .*{victim.name} exists and is not a {kind}: it would be "
                                                r"replaced by the predictions; give a new file name"):
            run_predict(str(tiny_run), [str(photo)], fmt=fmt, output=str(victim))
        assert victim.read_bytes() == before


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_earlier_prediction_file_is_replaced_and_resume_appends(tiny_run: Path, tmp_path: Path, fmt: str) -> None:
    folder = tmp_path / "in"
    a, b = _png(folder / "a.png", 0), _png(folder / "b.png", 1)
    out = folder / f"preds.{fmt}"  # inside an input folder: fine, it is not an input image
    out.write_bytes(b"")  # an empty file: nothing to lose
    assert run_predict(str(tiny_run), [str(a)], fmt=fmt, output=str(out)) == 0
    assert run_predict(str(tiny_run), [str(b)], fmt=fmt, output=str(out)) == 0  # replaced: b only
    paths = _paths(out, fmt)
    assert paths == [str(b)]
    if fmt != "table":
        assert run_predict(str(tiny_run), [str(folder)], fmt=fmt, output=str(out), resume=True) == 0
        assert sorted(_paths(out, fmt)) == [str(a), str(b)]
    with pytest.raises(ImageRecError, match="exists and is not a"):  # another format's file is not replaced
        run_predict(str(tiny_run), [str(a)], fmt="csv" if fmt != "csv" else "json", output=str(out))


def _paths(out: Path, fmt: str) -> list[str]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return [r["path"] for r in pq.read_table(out).to_pylist()]
    lines = out.read_text().splitlines()
    if fmt == "json":
        return [json.loads(x)["path"] for x in lines]
    if fmt == "csv":
        return [x.split(",")[0] for x in lines[1:]]
    return [x.split("\t")[0] for x in lines]


def test_cli_refuses_with_one_line(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from imagerec.cli import main

    photo = _png(tmp_path / "photo.png", 0)
    before = photo.read_bytes()
    assert main(["predict", str(tiny_run), str(photo), "--output", str(photo)]) == 2
    assert capsys.readouterr().err == (f"error: --output {photo} is one of the inputs ({photo}): it would be replaced "
                                       "by the predictions; give another file name for --output\n")
    assert photo.read_bytes() == before
