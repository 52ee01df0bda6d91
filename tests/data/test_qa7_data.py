"""QA pass 7 (data): a manifest row that names one class twice (`3;3`) is that one label, for
single-label and multi-label data; and `test` asked of data that names its splits but has no test
images is refused (the default evaluates all of it, and says so) for every source that names
splits: archives, manifests with a split column, store datasets and IDX files, not only local folders.

The images are real mnist-mini digits written as PNGs; the store is a real SQLite file.
"""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

import imagerec
from imagerec.data import read_data
from imagerec.data.loader import targets_tensor
from imagerec.data.named import resolve_named_dataset
from imagerec.engine.evaluate import read_run_split
from imagerec.engine.run import class_counts
from imagerec.store import ingest, open_store
from imagerec.utils import ImageRecError

WriteDigits = Callable[..., list[tuple[Path, str]]]  # the write_digits fixture (tests/conftest.py)

TRAIN_CONFIG = {"val_fraction": 0.1, "seed": 0}  # as a run's checkpoint records them



# --- bug 1: a class repeated in one manifest row --------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_label_repeated_in_a_row_of_single_label_data_is_that_one_label(tmp_path: Path, fmt: str, write_digits: WriteDigits) -> None:
    rows = [(p.relative_to(tmp_path).as_posix(), c) for p, c in write_digits(tmp_path / "d", 3)]
    labels = [f"{c};{c}" if k == 0 else c for k, (_, c) in enumerate(rows)]  # the first row: '3;3'
    manifest = tmp_path / f"m.{fmt}"
    if fmt == "csv":
        manifest.write_text("path,label\n" + "".join(f"{p},{lab}\n" for (p, _), lab in zip(rows, labels, strict=True)))
    else:
        manifest.write_text("".join(json.dumps({"path": p, "label": lab.split(";")}) + "\n"
                                    for (p, _), lab in zip(rows, labels, strict=True)))
    spec = read_data(str(manifest))
    assert not spec.multi_label  # one label per image: a single-label dataset, as without the repeat
    assert spec.class_names == ["3", "5"]
    assert [it.target for it in spec.splits["train"]] == [0, 0, 0, 1, 1, 1]
    assert class_counts(spec.splits["train"], 2).tolist() == [3, 3]


def test_a_single_label_run_on_a_repeated_label_trains_single_label(tmp_path: Path, write_digits: WriteDigits) -> None:
    rows = [(p.relative_to(tmp_path).as_posix(), c) for p, c in write_digits(tmp_path / "d", 4)]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{c};{c}\n" if k % 4 == 0 else f"{p},{c}\n"
                                                 for k, (p, c) in enumerate(rows)))
    result = imagerec.train(data=str(manifest), out=str(tmp_path / "run"), model="cnn", epochs=1, batch_size=8,
                            augment="none", val_fraction=0.25)
    meta = json.loads((Path(result.run_dir) / "best.json").read_text())
    assert meta["preprocess"]["multi_label"] is False
    assert list(meta["preprocess"]["class_names"]) == ["3", "5"]


def test_a_label_repeated_in_a_row_of_multi_label_data_counts_once(tmp_path: Path, write_digits: WriteDigits) -> None:
    rows = [(p.relative_to(tmp_path).as_posix(), c) for p, c in write_digits(tmp_path / "d", 2)]
    manifest = tmp_path / "m.csv"
    labels = ["cat;cat", "cat;dog;cat", "dog | dog", "cat"]
    manifest.write_text("path,label\n" + "".join(f"{p},{lab}\n" for (p, _), lab in zip(rows, labels, strict=True)))
    spec = read_data(str(manifest))
    assert spec.multi_label and spec.class_names == ["cat", "dog"]
    items = spec.splits["train"]
    assert [it.target for it in items] == [(0,), (0, 1), (1,), (0,)]
    assert class_counts(items, 2).tolist() == [3, 2]
    assert targets_tensor(items, 2, True).tolist() == [[1, 0], [1, 1], [0, 1], [1, 0]]


# --- bug 2: --split test of data that names splits but has no test images -------------------------


def _archive(held: Path, kind: str) -> str:
    if kind == "tar.gz":
        with tarfile.open(held.parent / "held.tar.gz", "w:gz") as tar:
            tar.add(held, "held")  # wrapped in a held/ folder, as a packed folder is
        return str(held.parent / "held.tar.gz")
    return shutil.make_archive(str(held.parent / "held"), "zip", held)  # train/... at the top


def _manifest(held: Path, kind: str, split: bool) -> str:
    rows = [(p.relative_to(held.parent).as_posix(), p.parent.name) for p in sorted(held.rglob("*.png"))]
    path = held.parent / f"m.{kind}"
    if kind == "csv":
        path.write_text(("path,label,split\n" if split else "path,label\n")
                        + "".join(f"{p},{c}{',train' if split else ''}\n" for p, c in rows))
    else:
        path.write_text("".join(json.dumps({"path": p, "label": c, **({"split": "train"} if split else {})}) + "\n"
                                for p, c in rows))
    return str(path)


def _store(held: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = str(held.parent / "store.db")
    with open_store(url) as store:
        ingest(store, str(held), "held", progress=False)
    monkeypatch.setenv("IMAGEREC_DB", url)
    return "store:held"


@pytest.mark.parametrize("kind, why", [
    ("tar.gz", "it has train/ but no test/ folder"),
    ("zip", "it has train/ but no test/ folder"),
    ("csv", "no row of its manifest has split test"),
    ("jsonl", "no row of its manifest has split test"),
    ("store", "no image is stored in its test split"),
])
def test_test_split_of_data_that_names_splits_but_no_test_images(tmp_path: Path, kind: str, why: str,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture, write_digits: WriteDigits) -> None:
    held = tmp_path / "held"
    write_digits(held / "train", 3)
    data = (_store(held, monkeypatch) if kind == "store" else
            _manifest(held, kind, split=True) if kind in ("csv", "jsonl") else _archive(held, kind))
    with pytest.raises(ImageRecError) as e:  # asked for explicitly: refused, never the train images in its place
        read_run_split(TRAIN_CONFIG, data, "test", ["3", "5"], "run", multi_label=False)
    assert str(e.value).startswith(f"{data} has no 'test' split ({why}); it has: train, val. "), str(e.value)
    assert "--split all" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="imagerec"):  # the default: all of it, and said so
        _, items, split = read_run_split(TRAIN_CONFIG, data, None, ["3", "5"], "run", multi_label=False)
    assert (split, len(items)) == ("all", 6)
    warned = [r.getMessage() for r in caplog.records if "has no test images" in r.getMessage()]
    assert warned == [f"{data} has no test images ({why}): evaluating all 6 images of its train, val split(s) "
                      "instead, as split 'all'; choose one with --split"]


@pytest.mark.parametrize("kind", ["tar.gz", "csv", "jsonl"])
def test_data_that_names_no_splits_is_evaluated_whole_without_a_warning(tmp_path: Path, kind: str,
                                                                       caplog: pytest.LogCaptureFixture, write_digits: WriteDigits) -> None:
    """A plain <class>/<image> archive, or a manifest without a split column: held-out images, all of them."""
    held = tmp_path / "held"
    write_digits(held, 2)
    data = _manifest(held, kind, split=False) if kind != "tar.gz" else _archive(held, kind)
    with caplog.at_level(logging.WARNING, logger="imagerec"):
        for split in (None, "test"):
            _, items, name = read_run_split(TRAIN_CONFIG, data, split, ["3", "5"], "run", multi_label=False)
            assert (name, len(items)) == ("all", 4)
    assert not [r for r in caplog.records if "has no test images" in r.getMessage()]


def test_test_split_of_an_archive_with_test_images_is_the_test_images(tmp_path: Path, write_digits: WriteDigits) -> None:
    held = tmp_path / "held"
    write_digits(held / "train", 3)
    write_digits(held / "test", 2)
    _, items, split = read_run_split(TRAIN_CONFIG, _archive(held, "zip"), "test", ["3", "5"], "run", multi_label=False)
    assert (split, len(items)) == ("test", 4)


def test_test_split_of_idx_files_without_test_files_is_refused(tmp_path: Path) -> None:
    """MNIST-style IDX files name their splits too (train-*, t10k-*): train files alone have no test images."""
    (tmp_path / "idx").mkdir()
    for p in resolve_named_dataset("mnist-mini").glob("train-*"):
        shutil.copy(p, tmp_path / "idx" / p.name)
    with pytest.raises(ImageRecError, match=r"idx has no 'test' split \(it has no test files\); it has: train, val\. "):
        read_run_split(TRAIN_CONFIG, str(tmp_path / "idx"), "test", [str(d) for d in range(10)], "run", multi_label=False)
