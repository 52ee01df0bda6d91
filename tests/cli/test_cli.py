"""End-to-end tests of the `imagerec` command line on real MNIST digits.

Every command runs as a subprocess (`python -m imagerec.cli ...`) in a temporary working
directory, the way a user runs it. One small run is trained once per module (mnist-mini,
2 epochs, 2,000 training images) and shared by the eval/predict tests.

The central check is that `imagerec predict` and `imagerec eval` agree, exactly, on the same
images: same accuracy, same confusion matrix, same label for every image.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import imagerec
from imagerec.config import PreprocessConfig
from imagerec.data import read_data
from imagerec.utils import ImageRecError

CLASSES = [str(d) for d in range(10)]
TEST_SAMPLES_MINI = 1000  # mnist-mini test split


# --- helpers ----------------------------------------------------------------------------------------


def run_cli(*args: str | Path, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`imagerec ARGS` as a user would run it; returns the finished process (never raises on exit code)."""
    cmd = [sys.executable, "-m", "imagerec.cli", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess[str], *fragments: str, code: int = 2) -> str:
    """A clean failure: exit `code`, exactly one 'error: ...' line on stderr naming `fragments`, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def write_digits(root: Path, split: str, count: int, *, layout_split: str | None = None) -> list[Path]:
    """Write `count` real mnist-mini digits of `split` as PNGs into root/[layout_split/]<class>/.

    Digits are taken at an even stride through the split, so every class is represented.
    """
    spec = read_data("mnist-mini")
    items = spec.splits[split]
    stride = len(items) // count
    paths = []
    for k, item in enumerate(items[::stride][:count]):
        folder = root / layout_split / spec.class_names[item.target] if layout_split else root / spec.class_names[item.target]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{split}{k:04d}.png"
        Image.fromarray(spec.arrays[split][item.source.index]).save(path)
        paths.append(path)
    return paths


def true_label(path: str | Path) -> str:
    """The class of a digit written by `write_digits`: its folder name."""
    return Path(path).parent.name


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def confusion_from_predictions(rows: list[dict]) -> list[list[int]]:
    cm = np.zeros((len(CLASSES), len(CLASSES)), dtype=np.int64)
    for r in rows:
        cm[CLASSES.index(true_label(r["path"])), CLASSES.index(r["label"])] += 1
    return cm.tolist()


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working directory every command of this module runs in."""
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Environment for subprocesses (and this process): a private IMAGEREC_CACHE."""
    cache = tmp_path_factory.mktemp("imagerec-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMAGEREC_CACHE", str(cache))
        yield dict(os.environ)


@pytest.fixture(scope="module")
def trained(work: Path, env: dict[str, str]) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One small run shared by the module: cnn on 2,000 mnist-mini digits for 2 epochs (~10 s)."""
    run_dir = work / "run"
    proc = run_cli("train", "mnist-mini", "--out", run_dir, "--epochs", "2", "--limit-train", "2000", cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    return run_dir, proc


@pytest.fixture(scope="module")
def run_dir(trained: tuple[Path, subprocess.CompletedProcess[str]]) -> Path:
    return trained[0]


@pytest.fixture(scope="module")
def digits(work: Path) -> Path:
    """A folder dataset of real digits: train/<class>/*.png (50) and test/<class>/*.png (200)."""
    root = work / "digits"
    write_digits(root, "train", 50, layout_split="train")
    write_digits(root, "test", 200, layout_split="test")
    return root


@pytest.fixture(scope="module")
def few(work: Path) -> list[Path]:
    """40 real test digits in <class>/ folders, for the predict output formats."""
    return write_digits(work / "few", "test", 40)


@pytest.fixture(scope="module")
def few_predictions(run_dir: Path, few: list[Path], work: Path, env: dict[str, str]) -> list[dict]:
    """`imagerec predict RUN few --format json`, parsed (one dict per line)."""
    proc = run_cli("predict", run_dir, "few", "--format", "json", cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr
    return json_lines(proc.stdout)


# --- train ------------------------------------------------------------------------------------------


def test_train_writes_a_complete_run(trained: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    run_dir, proc = trained
    assert "Traceback" not in proc.stderr
    for name in ("config.yaml", "best.safetensors", "best.json", "last.safetensors", "last.json",
                 "history.csv", "metrics.json", "eval-test.json", "eval-val.json", "confusion-test.png"):
        assert (run_dir / name).is_file(), name
        assert (run_dir / name).stat().st_size > 0, name

    config = (run_dir / "config.yaml").read_text()
    assert re.search(r"^epochs: 2$", config, re.M) and re.search(r"^limit_train: 2000$", config, re.M), config

    with open(run_dir / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in history] == [1, 2]
    assert all(0.0 <= float(r["val_accuracy"]) <= 1.0 for r in history)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model"] == "cnn"
    assert metrics["epochs_run"] == 2
    assert metrics["train_images"] == 2000
    assert metrics["skipped_files"] == []
    assert metrics["test"]["num_samples"] == TEST_SAMPLES_MINI
    assert metrics["val"]["num_samples"] == 600  # 10% of mnist-mini's 6,000 training digits
    assert metrics["test"]["accuracy"] > 0.8, metrics["test"]["accuracy"]
    # the best checkpoint's val accuracy is the one history recorded for the best epoch
    assert metrics["val"]["accuracy"] == pytest.approx(float(history[metrics["best_epoch"] - 1]["val_accuracy"]), abs=1e-9)

    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == f"run saved in {run_dir}"
    test_line = next(line for line in lines if line.startswith("test: "))
    assert f"accuracy {metrics['test']['accuracy']:.2%}" in test_line


# --- eval -------------------------------------------------------------------------------------------


def test_eval_json_prints_one_object_and_writes_outputs(run_dir: Path, work: Path, env: dict[str, str]) -> None:
    (run_dir / "eval-test.json").unlink()
    (run_dir / "confusion-test.png").unlink()
    proc = run_cli("eval", run_dir, "--format", "json", cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1  # one JSON object on one line
    m = json.loads(proc.stdout)

    for key in ("accuracy", "top5", "loss", "macro_f1", "balanced_accuracy", "per_class", "confusion_matrix"):
        assert key in m, key
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (10, 10)
    assert cm.sum() == TEST_SAMPLES_MINI == m["num_samples"]
    assert m["accuracy"] == pytest.approx(np.trace(cm) / cm.sum(), abs=1e-12)
    assert list(m["per_class"]) == CLASSES
    assert [m["per_class"][c]["support"] for c in CLASSES] == cm.sum(axis=1).tolist()
    assert 0.8 < m["accuracy"] <= m["top5"] <= 1.0

    # the same numbers as the evaluation at the end of training
    final = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert m["confusion_matrix"] == final["confusion_matrix"]
    assert m["accuracy"] == final["accuracy"]

    assert json.loads((run_dir / "eval-test.json").read_text()) == m
    with Image.open(run_dir / "confusion-test.png") as im:
        assert im.format == "PNG" and min(im.size) > 100


def test_eval_table_prints_a_row_per_class(run_dir: Path, work: Path, env: dict[str, str]) -> None:
    proc = run_cli("eval", run_dir, cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((run_dir / "eval-test.json").read_text())
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 5 and cells[0] in CLASSES:
            rows[cells[0]] = cells
    assert sorted(rows) == CLASSES, proc.stdout
    for c, (_, precision, recall, f1, support) in rows.items():
        pc = m["per_class"][c]
        assert (precision, recall, f1) == (f"{pc['precision']:.3f}", f"{pc['recall']:.3f}", f"{pc['f1']:.3f}")
        assert int(support) == pc["support"] == 100
    assert f"accuracy {m['accuracy']:.2%}" in proc.stdout
    assert f"expected calibration error (ECE, 15 bins) {m['ece']:.4f}" in proc.stdout  # README promises it
    assert f"written: {run_dir / 'eval-test.json'}" in proc.stdout


# --- predict ----------------------------------------------------------------------------------------


def test_predict_json_one_object_per_image(few_predictions: list[dict], few: list[Path], work: Path) -> None:
    rows = few_predictions
    assert sorted(r["path"] for r in rows) == sorted(str(p.relative_to(work)) for p in few)
    for r in rows:
        assert set(r) == {"path", "label", "score", "topk"}
        assert r["label"] in CLASSES
        assert len(r["topk"]) == 5
        assert r["topk"][0] == {"label": r["label"], "score": r["score"]}
        scores = [t["score"] for t in r["topk"]]
        assert scores == sorted(scores, reverse=True) and 0.0 < sum(scores) <= 1.0 + 1e-5
    right = sum(r["label"] == true_label(r["path"]) for r in rows)
    assert right / len(rows) > 0.7, right


def test_predict_csv_table_and_globs_agree_with_json(run_dir: Path, few: list[Path], few_predictions: list[dict], work: Path,
                                                     env: dict[str, str]) -> None:
    ref = {r["path"]: r for r in few_predictions}
    assert len(ref) == len(few)

    # csv to a file, with --top-k 3
    proc = run_cli("predict", run_dir, "few", "--format", "csv", "--top-k", "3", "--output", "pred.csv", cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    with open(work / "pred.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == list(ref)
    for r in rows:
        topk = json.loads(r["topk"])  # [[label, score], ...]
        assert len(topk) == 3
        assert r["label"] == ref[r["path"]]["label"] == topk[0][0]
        assert float(r["score"]) == ref[r["path"]]["score"]
        assert [t[0] for t in topk] == [t["label"] for t in ref[r["path"]]["topk"][:3]]
        assert r["error"] == ""

    # table, on glob patterns that imagerec expands itself (no shell here)
    proc = run_cli("predict", run_dir, "few/1/*.png", "few/[27]/*.png", "--top-k", "3", cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    expected = sorted(str(p.relative_to(work)) for p in few if true_label(p) in ("1", "2", "7"))
    lines = proc.stdout.strip().splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == expected
    for line in lines:
        path, label, score, alts = line.split("\t")
        assert label == ref[path]["label"]
        assert score == f"{ref[path]['score']:.1%}"
        assert len(alts.split("  ")) == 2  # the other two of the top 3

    # recursive glob: the same images as the folder
    proc = run_cli("predict", run_dir, "few/**/*.png", "--format", "json", "--top-k", "1", cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = json_lines(proc.stdout)
    assert {r["path"]: r["label"] for r in rows} == {p: r["label"] for p, r in ref.items()}
    assert all(len(r["topk"]) == 1 for r in rows)


def test_predict_accuracy_equals_eval_accuracy_on_the_same_images(run_dir: Path, digits: Path, work: Path, env: dict[str, str]) -> None:
    """The bug users hit most with other tools: "eval says 96%, predict says 60%"."""
    ev = run_cli("eval", run_dir, digits, "--split", "test", "--format", "json", cwd=work, env=env)
    assert ev.returncode == 0, ev.stderr
    m = json.loads(ev.stdout)
    pr = run_cli("predict", run_dir, digits / "test", "--format", "json", cwd=work, env=env)
    assert pr.returncode == 0, pr.stderr
    rows = json_lines(pr.stdout)

    assert len(rows) == m["num_samples"] == 200
    assert m["split"] == "test" and m["skipped_files"] == []
    accuracy = sum(r["label"] == true_label(r["path"]) for r in rows) / len(rows)
    assert accuracy == m["accuracy"]
    assert confusion_from_predictions(rows) == m["confusion_matrix"]
    assert accuracy > 0.8


def test_predict_agrees_with_eval_image_by_image(run_dir: Path, digits: Path, env: dict[str, str]) -> None:
    """The Python API's Predictor gives, for every image, the argmax of the logits eval computes."""
    from imagerec.data import split_train_val
    from imagerec.data.decode import source_name
    from imagerec.engine.checkpoint import load_model
    from imagerec.engine.evaluate import create_eval_loader, remap_items
    from imagerec.engine.pipeline import BatchPipeline, predict_logits
    from imagerec.utils import resolve_device, resolve_precision

    # eval's own path (the steps evaluate_run takes), keeping the per-image logits
    model, meta = load_model(run_dir)
    pre = PreprocessConfig.from_dict(meta["preprocess"])
    spec = split_train_val(read_data(str(digits)), 0.1, 0)
    items = remap_items(spec, "test", list(pre.class_names))
    device = resolve_device("auto")
    model.to(device).to(memory_format=torch.channels_last)
    loader = create_eval_loader(spec, items, pre)
    logits, targets, index = predict_logits(model, loader, BatchPipeline(pre, device, True), resolve_precision("auto", device))
    eval_labels = {source_name(items[i].source): pre.class_names[k] for i, k in zip(index, logits.argmax(axis=1), strict=True)}
    m = imagerec.evaluate(str(run_dir), str(digits), "test", write=False)
    assert float(np.mean(logits.argmax(axis=1) == targets)) == m["accuracy"]  # the same computation as eval

    results = imagerec.load(str(run_dir)).predict(list(eval_labels))
    assert len(results) == len(eval_labels) == 200
    disagree = [(r["path"], r["label"], eval_labels[r["path"]]) for r in results if r["label"] != eval_labels[r["path"]]]
    assert disagree == []


class _TiedLogits(torch.nn.Module):
    """Returns the same logits for every image; classes 2 and 5 tie for the top score.

    These are real bf16 logits from an image where `predict` once said 5 and `eval` said 2.
    """

    LOGITS = [0.9921875, -0.12890625, 1.2734375, 0.31445312, -0.66796875, 1.2734375, 0.64453125, 0.85546875, -0.05615234, 0.578125]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.LOGITS).expand(x.shape[0], -1)


def test_predict_breaks_ties_like_eval() -> None:
    """Eval counts argmax (first of tied maxima); predict must name the same class, in batches too."""
    from imagerec.metrics import classification_metrics
    from imagerec.predict import Predictor

    pre = PreprocessConfig(28, 1, (0.5,), (0.5,), 28, tuple(CLASSES))
    predictor = Predictor(_TiedLogits(), pre, device="cpu", precision="fp32")
    images = [Image.new("L", (28, 28), v) for v in range(0, 250, 5)]  # a batch of 50
    results = predictor.predict(images, top_k=3)
    m = classification_metrics(np.array([_TiedLogits.LOGITS] * len(images)), np.full(len(images), 2), CLASSES)
    assert m["accuracy"] == 1.0  # eval says: class 2
    assert {r["label"] for r in results} == {"2"}
    assert [t["label"] for t in results[0]["topk"]] == ["2", "5", "0"]


# --- bad input: one clear line, no traceback ----------------------------------------------------------


def test_train_missing_data_folder(work: Path, env: dict[str, str]) -> None:
    proc = run_cli("train", "no/such/folder", "--out", "r-missing", "--epochs", "1", cwd=work, env=env)
    assert_user_error(proc, "data not found: no/such/folder")
    assert not (work / "r-missing").exists()


def test_train_unknown_model_suggests_a_name(work: Path, env: dict[str, str]) -> None:
    proc = run_cli("train", "mnist-mini", "--model", "resnt18", "--out", "r-model", "--epochs", "1", cwd=work, env=env)
    assert_user_error(proc, "resnt18", "Did you mean 'resnet18'?")
    assert not (work / "r-model").exists()


def test_train_unknown_config_key_suggests_a_key(work: Path, env: dict[str, str]) -> None:
    (work / "typo.yaml").write_text("model: cnn\nepoch: 3\n")
    proc = run_cli("train", "mnist-mini", "--config", "typo.yaml", "--out", "r-config", cwd=work, env=env)
    assert_user_error(proc, "'epoch'", "typo.yaml", "Did you mean 'epochs'?")
    assert not (work / "r-config").exists()


def test_train_bad_flag_value(work: Path, env: dict[str, str]) -> None:
    proc = run_cli("train", "mnist-mini", "--augment", "strongg", "--out", "r-aug", "--epochs", "1", cwd=work, env=env)
    assert_user_error(proc, "strongg", "Did you mean 'strong'?")
    assert not (work / "r-aug").exists()


def test_eval_nonexistent_run(work: Path, env: dict[str, str]) -> None:
    proc = run_cli("eval", "runs/never-trained", "--format", "json", cwd=work, env=env)
    assert_user_error(proc, "runs/never-trained")
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [(("--seed", "-1"), "seed must be a finite number >= 0, got -1"),
     (("--grad-clip", "-1"), "grad_clip must be a finite number >= 0"),
     (("--mixup", "nan"), "mixup must be a finite number >= 0, got nan"),
     (("--momentum", "-5"), "momentum must be in [0, 1), got -5.0"),
     (("--weight-decay", "-1"), "weight_decay must be a finite number >= 0"),
     (("--early-stopping", "-2"), "early_stopping must be a finite number >= 0"),
     (("--workers", "-7"), "workers is a number of loader processes"),
     (("--limit-train", "-5"), "limit_train is a number of training images, 0 for all; got -5"),
     (("--max-pixels", "0"), "max_pixels must be at least 1, got 0"),
     (("--lr", "inf"), "lr must be a finite positive number, got inf")],
)
def test_train_numbers_out_of_range(work: Path, env: dict[str, str], flags: tuple[str, str], fragment: str) -> None:
    proc = run_cli("train", "mnist-mini", *flags, "--out", "r-range", "--epochs", "1", cwd=work, env=env)
    assert_user_error(proc, fragment)
    assert not (work / "r-range").exists()


def test_bad_output_paths_get_one_line_not_a_traceback(run_dir: Path, digits: Path, work: Path, env: dict[str, str]) -> None:
    (work / "afile").write_text("not a folder")
    assert_user_error(run_cli("train", "mnist-mini", "--out", "afile", "--epochs", "1", cwd=work, env=env),
                      "--out afile is a file")
    assert_user_error(run_cli("train", "mnist-mini", "--out", "afile/sub", "--epochs", "1", cwd=work, env=env),
                      "afile/sub", "Not a directory")
    (work / "notes").mkdir(exist_ok=True)
    (work / "notes" / "todo.txt").write_text("x")
    assert_user_error(run_cli("train", "mnist-mini", "--out", "notes", "--epochs", "1", cwd=work, env=env),
                      "--out notes is a folder that is not empty and holds no run (todo.txt)")
    (work / "outdir").mkdir(exist_ok=True)
    digit = next(iter(sorted(digits.rglob("*.png"))))
    assert_user_error(run_cli("predict", run_dir, digit, "--output", "outdir", cwd=work, env=env),
                      "outdir", "Is a directory")
    assert (work / "afile").read_text() == "not a folder"


def test_config_file_that_is_not_utf8(work: Path, env: dict[str, str]) -> None:
    (work / "binary.yaml").write_bytes(b"\xff\xfe\x00bin")
    proc = run_cli("train", "mnist-mini", "--config", "binary.yaml", "--out", "r-bin", cwd=work, env=env)
    assert_user_error(proc, "binary.yaml is not UTF-8 text (byte 0xff at 0); save it as UTF-8")


def test_divergence_is_a_clear_error(work: Path, env: dict[str, str]) -> None:
    proc = run_cli("train", "mnist-mini", "--lr", "1e9", "--limit-train", "200", "--epochs", "1", "--out", "r-div",
                   cwd=work, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: training diverged: the model's outputs on the validation "
                                                           "images became NaN or infinite in epoch 1; lower --lr (it is 1000000000.0)")


def test_resume_of_a_run_stopped_before_its_first_checkpoint(work: Path, env: dict[str, str],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    (work / "early").mkdir()
    (work / "early" / "config.yaml").write_text("model: cnn\n")
    assert_user_error(run_cli("train", "--resume", "early", cwd=work, env=env),
                      "early holds a run that stopped before its first checkpoint: nothing to resume",
                      "train it again with the same --out")
    # ... and training it again there works (it used to say the folder "holds no run": a circle)
    from imagerec.cli import main

    with caplog.at_level("WARNING", logger="imagerec"):
        assert main(["train", "mnist-mini", "--out", str(work / "early"), "--limit-train", "128", "--epochs", "1",
                     "--val-fraction", "0.02"]) == 0
    assert "holds only the config.yaml of a run that stopped before its first checkpoint" in caplog.text
    assert (work / "early" / "last.json").is_file() and "epochs: 1" in (work / "early" / "config.yaml").read_text()
    # a folder with anything else in it is still refused
    (work / "other").mkdir()
    (work / "other" / "config.yaml").write_text("model: cnn\n")
    (work / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ImageRecError, match="not empty and holds no run"):
        imagerec.train(data="mnist-mini", out=str(work / "other"))


def test_resume_applies_a_config_file_like_flags(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--resume DIR --config FILE` used to ignore the file: its keys are resume overrides, checked as flags are."""
    from imagerec.cli import main

    assert main(["train", "mnist-mini", "--out", str(work / "rc"), "--limit-train", "128", "--epochs", "1",
                 "--val-fraction", "0.02"]) == 0
    (work / "ep2.yaml").write_text("epochs: 2\nworkers: 0\n")
    (work / "changed.yaml").write_text("optimizer: sgd\nlr: 0.5\n")
    capsys.readouterr()
    assert main(["train", "--resume", str(work / "rc"), "--config", str(work / "changed.yaml")]) == 2
    assert f"error: --resume {work / 'rc'} cannot change --optimizer 'sgd' (it was 'adamw')" in capsys.readouterr().err
    assert len((work / "rc" / "history.csv").read_text().strip().splitlines()) == 2  # refused: nothing trained
    assert main(["train", "--resume", str(work / "rc"), "--config", str(work / "ep2.yaml")]) == 0
    assert len((work / "rc" / "history.csv").read_text().strip().splitlines()) == 3
    assert "epochs: 2\n" in (work / "rc" / "config.yaml").read_text()
    # flags win over the file, as without --resume
    assert main(["train", "--resume", str(work / "rc"), "--config", str(work / "ep2.yaml"), "--epochs", "3"]) == 0
    assert len((work / "rc" / "history.csv").read_text().strip().splitlines()) == 4


def test_resume_without_checkpoint(work: Path, env: dict[str, str]) -> None:
    (work / "not-a-run").mkdir()
    (work / "not-a-run" / "notes.txt").write_text("hello")
    proc = run_cli("train", "--resume", "not-a-run", cwd=work, env=env)
    assert_user_error(proc, "not-a-run", "no checkpoint")


def test_predict_folder_without_images(run_dir: Path, work: Path, env: dict[str, str]) -> None:
    (work / "no-images").mkdir()
    (work / "no-images" / "readme.txt").write_text("no pictures here")
    proc = run_cli("predict", run_dir, "no-images", cwd=work, env=env)
    assert_user_error(proc, "no images found", "no-images")


def test_predict_skips_bad_files_and_names_them(run_dir: Path, work: Path, env: dict[str, str]) -> None:
    good = write_digits(work / "mixed", "test", 10)
    folder = work / "mixed" / "bad"
    folder.mkdir()
    (folder / "corrupt.png").write_bytes(good[0].read_bytes()[:60])  # truncated PNG
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is text, not a JPEG\n")
    bad = ["mixed/bad/corrupt.png", "mixed/bad/empty.png", "mixed/bad/notes.jpg"]

    proc = run_cli("predict", run_dir, "mixed", "--format", "json", cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = json_lines(proc.stdout)
    assert len(rows) == 13
    predicted = {r["path"] for r in rows if "label" in r}
    assert predicted == {str(p.relative_to(work)) for p in good}
    assert {r["path"] for r in rows if "error" in r} == set(bad)
    err_lines = proc.stderr.strip().splitlines()
    for name in bad:
        assert any(line.startswith(f"error: {name}") for line in err_lines), (name, proc.stderr)
    assert err_lines[-1] == "3 of 13 input(s) could not be read"

    # nothing readable at all: exit 1, and still no traceback
    proc = run_cli("predict", run_dir, *bad, cwd=work, env=env)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] == "3 of 3 input(s) could not be read"


def test_training_folder_with_bad_files_completes(work: Path, env: dict[str, str]) -> None:
    root = work / "dirty"
    good_train = write_digits(root, "train", 100, layout_split="train")
    good_test = write_digits(root, "test", 40, layout_split="test")
    (root / "train" / "1" / "corrupt.png").write_bytes(good_train[0].read_bytes()[:60])
    (root / "train" / "2" / "empty.png").write_bytes(b"")
    (root / "train" / "3" / "text.jpg").write_text("not an image\n")
    (root / "test" / "4" / "empty-test.png").write_bytes(b"")
    (root / "train" / "5" / "readme.txt").write_text("ignored: not an image extension\n")
    bad = ["dirty/train/1/corrupt.png", "dirty/train/2/empty.png", "dirty/train/3/text.jpg", "dirty/test/4/empty-test.png"]

    proc = run_cli("train", "dirty", "--out", "r-dirty", "--epochs", "1", cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "run saved in r-dirty"
    metrics = json.loads((work / "r-dirty" / "metrics.json").read_text())
    skipped = metrics["skipped_files"]
    assert len(skipped) == len(bad)
    for name in bad:  # DATA 'dirty' is read (and saved) as an absolute path
        assert sum(s.startswith(f"{work.resolve() / name}:") for s in skipped) == 1, (name, skipped)
    assert metrics["train_images"] + metrics["val"]["num_samples"] == len(good_train)
    assert metrics["test"]["num_samples"] == len(good_test)
    assert metrics["epochs_run"] == 1


# --- models, help, demo -----------------------------------------------------------------------------


def test_models_lists_the_registry_with_parameter_counts(work: Path, env: dict[str, str]) -> None:
    from imagerec.models import count_parameters, create_model

    proc = run_cli("models", cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    params = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 3 and cells[0] and re.fullmatch(r"\d+\.\d\dM", cells[1]):
            params[cells[0]] = cells[1]
    for name in ("mlp", "cnn", "rnn", "vit-tiny", "resnet18", "resnet50"):
        n = count_parameters(create_model(name, num_classes=10, in_chans=3, img_size=32))
        assert params.get(name) == f"{n / 1e6:.2f}M", (name, params)
    assert float(params["resnet50"][:-1]) > float(params["resnet18"][:-1]) > 10 > float(params["cnn"][:-1])


def test_help_exits_zero_with_examples(work: Path, env: dict[str, str]) -> None:
    proc = run_cli("--help", cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    for word in ("train", "eval", "predict", "models", "demo", "examples:"):
        assert word in proc.stdout
    proc = run_cli("train", "--help", cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--epochs", "--limit-train", "--augment", "--resume", "--config"):
        assert flag in proc.stdout
    assert re.search(r"--warmup-epochs X\s+epochs of learning-rate warm-up", proc.stdout), proc.stdout


def test_demo_trains_evaluates_and_predicts(work: Path, env: dict[str, str]) -> None:
    # A previous demo already lives in demo-out: a new one must not fail, but go next to it.
    (work / "demo-out").mkdir()
    (work / "demo-out" / "old.txt").write_text("an earlier run")
    proc = run_cli("demo", "--out", "demo-out", "--epochs", "1", cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "trained: cnn on mnist-mini" in out
    acc = re.search(r"^test accuracy: ([\d.]+)% on 1000 held-out digits", out, re.M)
    assert acc and float(acc.group(1)) > 80.0, out
    saved = re.search(r"^run saved in: (\S+)$", out, re.M)
    assert saved and saved.group(1) == "demo-out2", out
    metrics = json.loads((work / "demo-out2" / "metrics.json").read_text())
    assert f"{metrics['test']['accuracy']:.2%}" == f"{acc.group(1)}%"
    assert (work / "demo-out" / "old.txt").read_text() == "an earlier run"
    assert len(list((work / "demo-out2" / "samples").glob("*.png"))) == 8


# --- the Python API mirrors the CLI ---------------------------------------------------------------------


def test_python_api_mirrors_the_cli(run_dir: Path, few: list[Path], work: Path, env: dict[str, str],
                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = imagerec.train(data="mnist-mini", out=str(tmp_path / "api-run"), epochs=1, limit_train=500)
    assert result.run_dir == tmp_path / "api-run"
    assert result.metrics["train_images"] == 500 and result.metrics["epochs_run"] == 1
    assert result.metrics["test"]["num_samples"] == TEST_SAMPLES_MINI
    assert json.loads((result.run_dir / "metrics.json").read_text())["test"]["accuracy"] == result.metrics["test"]["accuracy"]

    # evaluate() == `imagerec eval --format json` on the shared run
    cli = json.loads(run_cli("eval", run_dir, "--format", "json", cwd=work, env=env).stdout)
    api = imagerec.evaluate(str(run_dir), write=False)
    assert api["confusion_matrix"] == cli["confusion_matrix"]
    assert api["accuracy"] == cli["accuracy"]
    assert api["per_class"] == cli["per_class"]
    assert api["loss"] == pytest.approx(cli["loss"], rel=1e-9)

    # load().predict() == `imagerec predict --format json`
    cli_rows = json_lines(run_cli("predict", run_dir, *few[:8], "--format", "json", cwd=work, env=env).stdout)
    api_rows = imagerec.load(str(run_dir)).predict(few[:8])
    assert [r["path"] for r in api_rows] == [str(p) for p in few[:8]]
    assert [r["label"] for r in api_rows] == [r["label"] for r in cli_rows]
    assert [r["topk"] for r in api_rows] == [r["topk"] for r in cli_rows]


def test_python_predict_takes_arrays_and_refuses_what_it_cannot_read(run_dir: Path, digits: Path) -> None:
    import imagerec

    predictor = imagerec.load(run_dir)
    path = next(iter(sorted(digits.rglob("*.png"))))
    pixels = np.asarray(Image.open(path))
    by_path, = predictor.predict(path, top_k=3)
    by_array, = predictor.predict(pixels, top_k=3)
    assert by_array["topk"] == by_path["topk"] and by_array["path"] == "<image 0>"
    batch = predictor.predict(np.stack([pixels, 255 - pixels]), top_k=1)
    assert len(batch) == 2 and batch[0]["label"] == by_path["label"]
    bad, = predictor.predict(pixels.astype(np.float32))
    assert "array of dtype float32 and shape (28, 28): give uint8 pixels" in bad["error"]
    with pytest.raises(ImageRecError, match="top_k must be at least 1, got 0"):
        predictor.predict(path, top_k=0)
    with pytest.raises(ImageRecError, match="cannot predict on a dict"):
        predictor.predict([{"image": path}])


def test_every_training_image_unreadable_says_so(digits: Path, work: Path, env: dict[str, str]) -> None:
    proc = run_cli("train", digits, "--max-pixels", "10", "--epochs", "1", "--out", "r-none", cwd=work, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: none of the 40 training images of") and "could be read" in last, last  # 50 - 10 val


@pytest.mark.parametrize("command", [["check", "mnist"], ["ingest", "mnist", "--dataset", "m"], ["train", "mnist", "--epochs", "1"]])
def test_data_dir_flag_is_where_named_datasets_are_looked_for(tmp_path: Path, command: list[str]) -> None:
    """README: named datasets are found in `--data-dir`, `$IMAGEREC_DATA` or the cache; the offline
    error names the --data-dir folder it looked in and the flag."""
    env = {k: v for k, v in os.environ.items() if k != "IMAGEREC_DATA"}
    env.update(IMAGEREC_OFFLINE="1", IMAGEREC_DB=str(tmp_path / "store.db"))
    data_dir = tmp_path / "datasets"
    proc = run_cli(*command, "--data-dir", data_dir, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"Put these files in {data_dir / 'mnist'}/" in proc.stderr
    assert "--data-dir DIR" in proc.stderr and "$IMAGEREC_DATA" in proc.stderr


def test_export_data_takes_data_dir(run_dir: Path, tmp_path: Path) -> None:
    """`export --data NAME` finds a named dataset through `--data-dir` as the other commands do."""
    env = {k: v for k, v in os.environ.items() if k != "IMAGEREC_DATA"}
    env.update(IMAGEREC_OFFLINE="1")
    data_dir = tmp_path / "datasets"
    proc = run_cli("export", run_dir, "--out", tmp_path / "b", "--data", "mnist", "--data-dir", data_dir,
                   cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"Put these files in {data_dir / 'mnist'}/" in proc.stderr
    assert not (tmp_path / "b").exists()


# --- DATA saved with the run; eval of a plain folder -------------------------------------------------


def _with_saved_data(run: Path, dest: Path, data: str) -> Path:
    """A copy of `run` whose checkpoints say it was trained on `data` (as an older imagerec saved
    DATA: exactly as typed, relative to the folder training ran in)."""
    import shutil

    shutil.copytree(run, dest)
    for name in ("best.json", "last.json"):
        meta = json.loads((dest / name).read_text())
        meta["train_config"]["data"] = data
        (dest / name).write_text(json.dumps(meta))
    return dest


def test_train_saves_a_local_data_path_absolute_and_eval_finds_it_anywhere(work: Path, env: dict[str, str],
                                                                          tmp_path: Path) -> None:
    import yaml

    folder = work / "rel-data"
    write_digits(folder, "train", 60, layout_split="train")
    write_digits(folder, "test", 20, layout_split="test")
    proc = run_cli("train", "rel-data", "--out", "r-rel", "--epochs", "1", "--model", "mlp", cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load((work / "r-rel" / "config.yaml").read_text())["data"] == str(folder.resolve())
    assert json.loads((work / "r-rel" / "best.json").read_text())["train_config"]["data"] == str(folder.resolve())
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "rel-data" / "7").mkdir(parents=True)  # other data at the relative path: not used
    proc = run_cli("eval", work / "r-rel", "--format", "json", cwd=elsewhere, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["num_samples"] == 20


def test_old_run_with_a_relative_data_path_never_evaluates_other_data(run_dir: Path, few: list[Path], tmp_path: Path,
                                                                    env: dict[str, str]) -> None:
    import shutil

    old = _with_saved_data(run_dir, tmp_path / "old-run", "digits-here")
    (old / "eval-test.json").write_text('{"keep": true}')
    proc = run_cli("eval", old, cwd=tmp_path, env=env)  # nothing at digits-here from this folder
    assert_user_error(proc, "trained on DATA 'digits-here'", "saved relative to the folder training ran in",
                      "pass the data explicitly as DATA")
    shutil.copytree(few[0].parent.parent, tmp_path / "digits-here")  # other images at that path
    proc = run_cli("eval", old, cwd=tmp_path, env=env)
    assert_user_error(proc, "is not the data", "fingerprint differs", "relative to the folder training ran in",
                      "Pass the data to use explicitly as DATA")
    assert (old / "eval-test.json").read_text() == '{"keep": true}'  # the run's own result is not overwritten


def test_eval_of_a_folder_without_splits_evaluates_all_of_it(run_dir: Path, few: list[Path], work: Path,
                                                             env: dict[str, str]) -> None:
    proc = run_cli("eval", run_dir, "few", "--format", "json", cwd=work, env=env)  # few/<class>/*.png, no splits
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    assert (m["split"], m["num_samples"]) == ("all", len(few))
    assert (run_dir / "eval-all.json").is_file()
    train = imagerec.evaluate(run_dir, str(work / "few"), split="train", write=False)  # the run's val carve-out
    assert train["num_samples"] < len(few)
