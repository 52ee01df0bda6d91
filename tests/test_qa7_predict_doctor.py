"""QA pass 7 (predict, doctor, Python API, store export): a zero-frame video, `check --html` onto a
user's file, a malformed quarantine manifest, wrong argument types in `imagerec.evaluate`, and
`export-dataset` through a symbolic link.

A tiny untrained `mlp` run is written straight to a checkpoint, so nothing is trained; images are
small generated PNGs, and the zero-frame video is written by OpenCV, as a camera tool would.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

import imagerec
from imagerec.cli import main
from imagerec.doctor import check_data, undo_quarantine, write_html
from imagerec.predict_run import run_predict
from imagerec.store import export_dataset, ingest, open_store
from imagerec.utils import ImageRecError

cv2 = pytest.importorskip("cv2")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, untrained_run) -> Path:
    """An untrained 3-channel `mlp` run over 16 px images."""
    return untrained_run(tmp_path_factory.mktemp("qa7-run"), ("cat", "dog"), resize=18)


def _image_folder(root: Path) -> Path:
    """root/{cat,dog}/0..2.png: small distinct RGB images."""
    for c, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (20, 20), (40 * k, 90 * c, 30)).save(root / cls / f"{k}.png")
    return root


def _empty_video(path: Path) -> Path:
    """A valid AVI container with no frames (a recording stopped before its first frame)."""
    cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48)).release()
    assert path.stat().st_size > 0 and cv2.VideoCapture(str(path)).isOpened()
    return path


# --- bug 6: check --html onto a user's file ------------------------------------------------------
def test_check_html_refuses_a_file_inside_the_data_and_any_non_html_file(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = _image_folder(tmp_path / "data")
    victim = data / "cat" / "0.png"
    before = victim.read_bytes()
    assert main(["check", str(data), "--html", str(victim)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--html {victim} is inside the data folder" in err
    assert victim.read_bytes() == before
    assert main(["check", str(data), "--html", str(data / "report.html")]) == 2  # a new file there too
    assert not (data / "report.html").exists()
    photo = tmp_path / "photo.png"  # outside DATA, but a user's image
    photo.write_bytes(before)
    with pytest.raises(ImageRecError, match=f"--html {photo} exists and is not an HTML page"):
        write_html(check_data(str(data)), photo)
    assert photo.read_bytes() == before
    page = tmp_path / "page.html"  # an earlier report is replaced
    assert main(["check", str(data), "--html", str(page)]) == 0
    assert main(["check", str(data), "--html", str(page)]) == 0
    assert page.read_text().startswith("<!DOCTYPE html>")


def test_check_html_naming_a_folder_names_it(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = _image_folder(tmp_path / "data")
    out = tmp_path / "reports"
    out.mkdir()
    assert main(["check", str(data), "--html", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--html {out} is a folder" in err and ".tmp" not in err
    assert list(out.iterdir()) == []
    afile = tmp_path / "afile"
    afile.write_text("notes")
    assert main(["check", str(data), "--html", str(afile / "r.html")]) == 2  # its folder is a file
    err = capsys.readouterr().err
    assert f"cannot write the HTML report {afile / 'r.html'}: " in err and ".tmp" not in err
    assert afile.read_text() == "notes"


# --- bug 1: a zero-frame video -------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_a_zero_frame_video_gets_an_error_row(tiny_run: Path, tmp_path: Path, capsys, fmt: str) -> None:  # type: ignore[no-untyped-def]
    folder = _image_folder(tmp_path / "in")
    empty = _empty_video(folder / "empty.avi")
    out = tmp_path / f"preds.{fmt}"
    assert run_predict(str(tiny_run), [str(folder)], fmt=fmt, output=str(out)) == 0  # the images were predicted
    err = capsys.readouterr().err
    assert f"{empty}: video has no frames" in err and "1 of 7 input(s) could not be read" in err
    # resumed: only the video is tried again, and fails again (1, as for any input left unreadable)
    assert run_predict(str(tiny_run), [str(folder)], fmt=fmt, output=str(out), resume=True) == 1
    assert "1 of 1 input(s) could not be read" in capsys.readouterr().err
    if fmt == "json":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        import csv

        rows = list(csv.DictReader(out.open(newline="")))
    assert len(rows) == 7 and sorted(r["path"] for r in rows).count(str(empty)) == 1  # one row per input
    assert "no frames" in next(r["error"] for r in rows if r["path"] == str(empty))


def test_a_zero_frame_video_alone_exits_non_zero(tiny_run: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    empty = _empty_video(tmp_path / "empty.avi")
    assert main(["predict", str(tiny_run), str(empty), "--format", "json"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out) == {"path": str(empty), "error": f"{empty}: video has no frames (an empty video, or its "
                                                             "first frame does not decode)"}
    assert "1 of 1 input(s) could not be read" in err


# --- bug 5: a malformed quarantine manifest ------------------------------------------------------
@pytest.mark.parametrize(("moves", "why"), [
    ([{"src": 1, "dst": "x", "sha256": "0" * 64}], "entry 1: 'src' is not a path: 1"),
    ([{"dst": "x", "sha256": "0" * 64}], "entry 1: 'src' is missing"),
    ("abc", "'moves' must be a list of entries, not str"),
    ([{"src": "a", "dst": "b", "sha256": "c"}, 7], "entry 2 is not an object: 7"),
])
def test_undo_with_a_malformed_manifest_is_one_clear_error(tmp_path: Path, capsys, moves: object, why: str) -> None:  # type: ignore[no-untyped-def]
    manifest = tmp_path / "bad.json"
    manifest.write_text(json.dumps({"version": 1, "data_root": str(tmp_path), "moves": moves}))
    with pytest.raises(ImageRecError, match="not a readable quarantine manifest") as e:
        undo_quarantine(manifest)
    assert str(e.value) == f"{manifest}: not a readable quarantine manifest ({why})"
    assert main(["check", "--undo", str(manifest)]) == 2
    assert capsys.readouterr().err == f"error: {manifest}: not a readable quarantine manifest ({why})\n"


def test_a_malformed_manifest_restores_nothing(tmp_path: Path) -> None:
    """A good first entry is not moved back when a later one is unreadable: all or nothing."""
    kept = tmp_path / "q" / "a.png"
    kept.parent.mkdir()
    Image.new("L", (4, 4), 9).save(kept)
    sha = hashlib.sha256(kept.read_bytes()).hexdigest()
    src = tmp_path / "data" / "a.png"
    manifest = tmp_path / "q" / "m.json"
    manifest.write_text(json.dumps({"version": 1, "moves": [
        {"src": str(src), "dst": str(kept), "sha256": sha, "state": "moved"}, {"src": "b", "dst": "c"}]}))
    with pytest.raises(ImageRecError, match="entry 2: 'sha256' is missing"):
        undo_quarantine(manifest)
    assert kept.is_file() and not src.exists()


# --- bug 9: argument types of the Python API -----------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"split": 1}, "split must be a split name such as 'test' or 'val', got int 1"),
    ({"data": 5}, "data must be a path or name (a string), got int 5"),
    ({"run_dir": 123}, "run_dir must be a path or name (a string), got int 123"),
])
def test_evaluate_names_an_argument_of_the_wrong_type(tiny_run: Path, kwargs: dict, message: str) -> None:
    args = {"run_dir": str(tiny_run), **kwargs}
    with pytest.raises(ImageRecError) as e:
        imagerec.evaluate(**args)
    assert str(e.value) == message


def test_load_names_a_source_of_the_wrong_type_and_takes_a_path(tiny_run: Path) -> None:
    with pytest.raises(ImageRecError, match="source must be a path or name"):
        imagerec.load(123)  # type: ignore[arg-type]
    assert imagerec.load(tiny_run).class_names == ["cat", "dog"]  # type: ignore[arg-type]


# --- bug 10: export-dataset to a symbolic link ---------------------------------------------------
@pytest.fixture
def small_store(tmp_path: Path) -> str:
    """A SQLite store with dataset 'pets' (3 cats, 3 dogs)."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    with open_store(url) as store:
        assert ingest(store, str(_image_folder(tmp_path / "pets")), "pets", progress=False).added == 6
    return url


def test_export_dataset_through_a_link_to_an_empty_folder(small_store: str, tmp_path: Path) -> None:
    target = tmp_path / "empty"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    with open_store(small_store) as store:
        assert export_dataset(store, "pets", link) == 6
    assert link.is_symlink() and len(list(target.rglob("*.png"))) == 6  # the link kept, the images behind it
    with open_store(small_store) as store, pytest.raises(ImageRecError, match=f"{link} exists and is not an empty"):
        export_dataset(store, "pets", link)


def test_export_dataset_to_a_link_to_nothing_says_so(small_store: str, tmp_path: Path) -> None:
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    with open_store(small_store) as store, pytest.raises(ImageRecError, match=f"{link} is a symbolic link to "):
        export_dataset(store, "pets", link)
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []
