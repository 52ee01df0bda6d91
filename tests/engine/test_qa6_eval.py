"""QA pass 6 (eval, robustness): what `evaluate_run` and `evaluate_robustness` do with data they
cannot score as asked: no readable image, multi-label data for a single-label run, `test` asked of
data with a train/ split but no test images; and corruption/attack lists that mix 'all' or 'none'
with names.

The run is the session's `cnn_run` (tests/conftest.py: a `cnn` on mnist-mini), copied where a
command writes into it; the images are real mnist-mini digits written as PNGs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from imagerec.engine.evaluate import evaluate_run
from imagerec.robustness import evaluate_robustness
from imagerec.utils import ImageRecError

WriteDigits = Callable[..., list[tuple[Path, str]]]  # the write_digits fixture (tests/conftest.py)

FEW = {"corruptions": [], "attacks": [], "write": False}  # robustness: clean accuracy only



@pytest.fixture
def run(cnn_run: Path, copy_run: Callable[..., Path], tmp_path: Path) -> Path:
    """A copy of the session's run: the commands here write eval-*.json and robustness-*.json into it."""
    return copy_run(cnn_run, tmp_path / "run")


# --- bug 1: no image of the split can be read -----------------------------------------------------


def test_eval_of_data_none_of_whose_images_can_be_read_is_one_clear_error(run: Path, tmp_path: Path, write_digits: WriteDigits) -> None:
    good = write_digits(tmp_path / "src", 1)
    bad = tmp_path / "allbad"
    (bad / "3").mkdir(parents=True)
    (bad / "5").mkdir()
    (bad / "3" / "truncated.png").write_bytes(good[0][0].read_bytes()[:60])  # a real PNG, cut short
    (bad / "5" / "garbage.png").write_text("not an image")
    with pytest.raises(ImageRecError, match=r"none of the 2 'all' images of .*allbad could be read \(all were skipped"):
        evaluate_run(run, str(bad))
    assert not (run / "eval-all.json").exists()
    with pytest.raises(ImageRecError, match=r"none of the 2 'all' images of .*allbad could be read \(all were skipped"):
        evaluate_robustness(run, str(bad), **FEW)


# --- bug 2: multi-label DATA for a single-label run -----------------------------------------------


def write_manifest(path: Path, rows: list[tuple[Path, str]]) -> Path:
    path.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    return path


def test_single_label_run_refuses_images_with_several_labels(run: Path, tmp_path: Path, write_digits: WriteDigits) -> None:
    digits = write_digits(tmp_path / "d", 2)
    other = {"3": "5", "5": "3"}
    for rows in ([(digits[0][0], "3;5")] + digits[1:], [(p, f"{c};{other[c]}") for p, c in digits]):  # one row, all
        manifest = write_manifest(tmp_path / "multi.csv", rows)
        for evaluate in (evaluate_run, evaluate_robustness):
            with pytest.raises(ImageRecError) as e:
                evaluate(run, str(manifest), **({} if evaluate is evaluate_run else FEW))  # type: ignore[operator]
            message = str(e.value)
            assert "multi.csv is multi-label (images with several labels, e.g. '3;5'" in message, message
            assert f"{run} is a single-label model: give one label per image" in message, message


def test_single_label_run_evaluates_multi_label_data_with_one_label_per_image(run: Path, tmp_path: Path, write_digits: WriteDigits) -> None:
    """A ';' makes a manifest multi-label; where every image still has one label, the run scores it
    exactly as the same manifest written single-label."""
    digits = write_digits(tmp_path / "d", 3)
    single = evaluate_run(run, str(write_manifest(tmp_path / "single.csv", digits)), write=False)
    multi = evaluate_run(run, str(write_manifest(tmp_path / "multi.csv", [(p, f"{c};{c}") for p, c in digits])),
                         write=False)
    assert multi["num_samples"] == single["num_samples"] == 6
    assert (multi["accuracy"], multi["confusion_matrix"]) == (single["accuracy"], single["confusion_matrix"])
    r = evaluate_robustness(run, str(tmp_path / "multi.csv"), **FEW)
    assert r["clean_accuracy"] == single["accuracy"]


# --- bug 6: `test` of data with a train/ split but no test images ---------------------------------


@pytest.mark.parametrize("test_folder", [True, False], ids=["empty-test-folder", "no-test-folder"])
def test_test_split_of_data_with_train_but_no_test_images(run: Path, tmp_path: Path, test_folder: bool,
                                                          caplog: pytest.LogCaptureFixture, write_digits: WriteDigits) -> None:
    held = tmp_path / "held"
    write_digits(held / "train", 3)
    if test_folder:
        (held / "test" / "3").mkdir(parents=True)
        (held / "test" / "5").mkdir()
    why = "its test/ folder holds no images" if test_folder else "it has train/ but no test/ folder"
    for evaluate in (evaluate_run, evaluate_robustness):  # asked for explicitly: refused, never the train images
        with pytest.raises(ImageRecError) as e:
            evaluate(run, str(held), "test", **({} if evaluate is evaluate_run else FEW))  # type: ignore[operator]
        assert str(e.value).startswith(f"{held} has no 'test' split ({why}); it has: train, val. "), str(e.value)
        assert "--split all" in str(e.value)
    assert not (run / "eval-all.json").exists() and not (run / "robustness-all.json").exists()
    with caplog.at_level(logging.WARNING, logger="imagerec"):  # the default: all of it, and said so
        m = evaluate_run(run, str(held), write=False)
    assert (m["split"], m["num_samples"]) == ("all", 6)
    warned = [r.getMessage() for r in caplog.records if "has no test images" in r.getMessage()]
    assert warned == [f"{held} has no test images ({why}): evaluating all 6 images of its train, val split(s) "
                      "instead, as split 'all'; choose one with --split"]


def test_test_split_of_a_plain_class_folder_is_all_of_it(run: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture, write_digits: WriteDigits) -> None:
    """README: DATA without a test split (a plain <class>/<image> folder of held-out images) is evaluated whole."""
    write_digits(tmp_path / "plain", 2)
    with caplog.at_level(logging.WARNING, logger="imagerec"):
        for split in (None, "test", "TESTING"):
            m = evaluate_run(run, str(tmp_path / "plain"), split, write=False)
            assert (m["split"], m["num_samples"]) == ("all", 4)
    assert not [r for r in caplog.records if "has no test images" in r.getMessage()]


# --- bug 7: 'all' and 'none' beside names -------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"corruptions": ["all", "fog"]}, "'all' cannot be combined with names (all, fog): use --corruptions all, or a list"),
    ({"corruptions": ["fog", "None"]}, "'none' cannot be combined with names (fog, None): use --corruptions none"),
    ({"attacks": ["none", "fgsm"]}, "'none' cannot be combined with names (none, fgsm): use --attacks none"),
])
def test_all_or_none_beside_names_is_refused(run: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ImageRecError) as e:
        evaluate_robustness(run, write=False, **kwargs)
    assert str(e.value).startswith(message), str(e.value)


def test_none_alone_runs_nothing(run: Path) -> None:
    r = evaluate_robustness(run, limit=10, corruptions=["none"], attacks=["None"], write=False)
    assert (r["num_images"], r["corruptions"], r["attacks"], r["mean_corruption_accuracy"]) == (10, {}, {}, None)
