"""QA pass 6 (predict + config): globs over folders, store:NAME --resume, file names that are not
UTF-8, links to nothing, and the config's checks.

A tiny untrained `mlp` run is written straight to a checkpoint, so these tests train nothing; the
images are real CIFAR-10 JPEGs from the shared datasets.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from imagerec.config import PreprocessConfig, TrainConfig
from imagerec.data.readers import is_broken_link
from imagerec.engine.checkpoint import save_checkpoint
from imagerec.models import create_model
from imagerec.predict import expand_paths
from imagerec.predict_run import run_predict


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 3-channel `mlp` run over 16 px images."""
    root = tmp_path_factory.mktemp("qa6-run")
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=3, in_chans=3, img_size=16)
    pre = PreprocessConfig(16, 3, (0.5,) * 3, (0.25,) * 3, 18, ("a", "b", "c"))
    save_checkpoint(root / "best", model, {"model": "mlp", "model_kwargs": {"in_chans": 3, "img_size": 16},
                                           "preprocess": pre.to_dict(),
                                           "train_config": TrainConfig(data="somewhere").to_dict()})
    return root


@pytest.fixture(scope="module")
def jpegs(shared_datasets: Path) -> list[bytes]:
    """Six real CIFAR-10 JPEGs."""
    out: list[bytes] = []
    with tarfile.open(shared_datasets / "cifar10-jpg.tar.gz") as tar:
        for m in tar:
            if m.isfile() and m.name.endswith(".jpg"):
                f = tar.extractfile(m)
                assert f is not None
                out.append(f.read())
                if len(out) == 6:
                    break
    return out


def _rows(out: Path, fmt: str) -> list[dict]:
    if fmt == "json":
        return [json.loads(line) for line in out.read_text(errors="surrogateescape").splitlines()]
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(out.read_bytes().decode("utf-8", "surrogateescape"), newline="")))
    if fmt == "parquet":
        return pq.read_table(out).to_pylist()
    return [{"path": line.split("\t")[0]} for line in out.read_bytes().decode("utf-8", "surrogateescape").splitlines()]


# --- bug 1: a glob that matches folders ----------------------------------------------------------
def test_a_quoted_glob_searches_the_folders_it_matches(tmp_path: Path, jpegs: list[bytes]) -> None:
    photos = tmp_path / "photos"
    for sub, data in (("cats", jpegs[:2]), ("dogs", jpegs[2:4])):
        (photos / sub).mkdir(parents=True)
        for k, b in enumerate(data):
            (photos / sub / f"{k}.jpg").write_bytes(b)
    (photos / "top.jpg").write_bytes(jpegs[4])
    shell = expand_paths(sorted(str(p) for p in photos.iterdir()))  # what `predict photos/*` gets from the shell
    assert len(shell) == 5
    assert expand_paths([str(photos / "*")]) == shell
    assert expand_paths([str(photos / "c*")]) == [str(photos / "cats" / "0.jpg"), str(photos / "cats" / "1.jpg")]


# --- bug 2: store:NAME --resume ------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
def test_resume_over_a_stored_dataset_predicts_nothing_again(tiny_run: Path, tmp_path: Path, jpegs: list[bytes],
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    from imagerec.store import ingest, open_store

    src = tmp_path / "src" / "cat"
    src.mkdir(parents=True)
    for k, b in enumerate(jpegs[:3]):
        (src / f"{k}.jpg").write_bytes(b)
    monkeypatch.setenv("IMAGEREC_DB", str(tmp_path / "s.db"))
    with open_store() as store:
        ingest(store, str(tmp_path / "src"), "qa", progress=False)
    out = tmp_path / f"p.{fmt}"
    assert run_predict(str(tiny_run), ["store:qa"], fmt=fmt, output=str(out)) == 0
    first = _rows(out, fmt)
    assert len(first) == 3 and all("(store:" in r["path"] for r in first)
    capsys.readouterr()
    assert run_predict(str(tiny_run), ["store:qa"], fmt=fmt, output=str(out), resume=True) == 0
    again = _rows(out, fmt)
    assert [r["path"] for r in again] == [r["path"] for r in first]  # one row per input, none appended
    assert "3 prediction(s) already in" in capsys.readouterr().err


# --- bug 3: a file name that is not UTF-8 --------------------------------------------------------
@pytest.mark.parametrize("fmt", ["csv", "table", "json", "parquet"])
def test_a_name_that_is_not_utf8_is_written_in_every_format(tiny_run: Path, tmp_path: Path, jpegs: list[bytes],
                                                            fmt: str) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    latin1 = os.fsdecode(b"b_caf\xe9.jpg")  # a Latin-1 name, as old zip files and Windows shares hold
    for name, data in (("a_good.jpg", jpegs[0]), (latin1, jpegs[1]), ("c_good.jpg", jpegs[2])):
        (folder / name).write_bytes(data)
    out = tmp_path / f"out.{fmt}"
    assert run_predict(str(tiny_run), [str(folder)], fmt=fmt, output=str(out)) == 0
    rows = _rows(out, fmt)
    assert [Path(r["path"]).name for r in rows] == ["a_good.jpg", latin1 if fmt != "parquet" else "b_caf\\xe9.jpg",
                                                    "c_good.jpg"]
    assert all(not r.get("error") for r in rows)
    if fmt != "table":  # resume finds the row it wrote for that name: nothing is predicted twice
        assert run_predict(str(tiny_run), [str(folder)], fmt=fmt, output=str(out), resume=True) == 0
        assert [r["path"] for r in _rows(out, fmt)] == [r["path"] for r in rows]


# --- bug 4: a symbolic link to nothing -----------------------------------------------------------
def test_a_broken_link_gets_an_error_row_naming_its_target(tiny_run: Path, tmp_path: Path, jpegs: list[bytes],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpegs[0])
    link = folder / "b.jpg"
    link.symlink_to(tmp_path / "nowhere" / "b.jpg")
    assert is_broken_link(link)
    assert expand_paths([str(folder)]) == [str(folder / "a.jpg"), str(link)]
    assert expand_paths([str(link)]) == [str(link)]
    assert run_predict(str(tiny_run), [str(folder)], fmt="json") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in rows] == [str(folder / "a.jpg"), str(link)]
    assert "error" not in rows[0]
    assert rows[1]["error"].startswith(f"{link}: broken symbolic link -> {tmp_path / 'nowhere' / 'b.jpg'}")
    assert run_predict(str(tiny_run), [str(link)], fmt="json") == 1  # the only input: every input failed
    assert "broken symbolic link" in capsys.readouterr().err


# --- bugs 7 and 8: settings out of range are refused before any data is read --------------------
@pytest.mark.parametrize(("setting", "value", "message"), [
    ("seed", 2**63, "seed must be between 0 and 2**63-1, got 9223372036854775808"),
    ("seed", 2**64, "seed must be between 0 and 2**63-1, got 18446744073709551616"),
    ("num_threads", 2**63, "num_threads must be between 0 and 2**31-1, got 9223372036854775808"),
    ("norm_lr_scale", float("nan"), "norm_lr_scale must be a finite number > 0, got nan"),
    ("norm_lr_scale", float("inf"), "norm_lr_scale must be a finite number > 0, got inf"),
])
def test_out_of_range_settings_are_one_clear_error(setting: str, value: float, message: str) -> None:
    from imagerec.utils import ImageRecError

    with pytest.raises(ImageRecError, match=re.escape(message)):
        TrainConfig(data="somewhere", **{setting: value}).validate()
    TrainConfig(data="somewhere", seed=2**63 - 1, num_threads=1, norm_lr_scale=0.5).validate()  # the largest seed is fine


# --- bug 9: "did you mean" ignores case and knows other tools' names ------------------------------
def test_did_you_mean_ignores_case_and_knows_aliases(tmp_path: Path) -> None:
    from imagerec.config import OPTIMIZERS, apply_overrides
    from imagerec.models import create_model
    from imagerec.utils import ImageRecError, did_you_mean

    assert did_you_mean("adamW", OPTIMIZERS) == " Did you mean 'adamw'?"
    assert did_you_mean("adamw2", OPTIMIZERS) == " Did you mean 'adamw'?"  # spelling still works
    assert did_you_mean("zzzz", OPTIMIZERS) == ""
    with pytest.raises(ImageRecError, match="unknown optimizer 'adamW'.*Did you mean 'adamw'"):
        TrainConfig(data="somewhere", optimizer="adamW").validate()
    with pytest.raises(ImageRecError, match="unknown model 'MLP'. Did you mean 'mlp'"):
        create_model("MLP", num_classes=3)
    with pytest.raises(ImageRecError, match="unknown config key 'learning_rate' in test. Did you mean 'lr'"):
        apply_overrides(TrainConfig(data="somewhere"), {"learning_rate": 0.01}, "test")
    with pytest.raises(ImageRecError, match="unknown config key 'num_epochs' in test. Did you mean 'epochs'"):
        apply_overrides(TrainConfig(data="somewhere"), {"num_epochs": 3}, "test")


# --- bug 5: rows in input order, videos among images ---------------------------------------------
def test_videos_among_images_keep_the_input_order(tiny_run: Path, tmp_path: Path, jpegs: list[bytes],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import cv2
    import numpy as np

    clip = tmp_path / "clip.avi"
    frame = cv2.imdecode(np.frombuffer(jpegs[0], np.uint8), cv2.IMREAD_COLOR)  # a real picture, 3 frames of it
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (frame.shape[1], frame.shape[0]))
    assert writer.isOpened()
    for _ in range(3):
        writer.write(frame)
    writer.release()
    (tmp_path / "a.jpg").write_bytes(jpegs[1])
    (tmp_path / "z.jpg").write_bytes(jpegs[2])
    a, z = str(tmp_path / "a.jpg"), str(tmp_path / "z.jpg")
    assert run_predict(str(tiny_run), [str(clip), a, str(clip), z], fmt="json") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["path"], r.get("frame")) for r in rows] == [
        (str(clip), 0), (str(clip), 1), (str(clip), 2), (a, None), (str(clip), 0), (str(clip), 1), (str(clip), 2),
        (z, None)]
    assert run_predict(str(tiny_run), [str(tmp_path)], fmt="json") == 0  # a folder, sorted: a.jpg, clip.avi, z.jpg
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in rows] == [a, str(clip), str(clip), str(clip), z]


# --- bug 6: --resume with a table ----------------------------------------------------------------
def test_resume_of_a_table_is_refused_before_anything_is_predicted(tiny_run: Path, tmp_path: Path,
                                                                    jpegs: list[bytes]) -> None:
    from imagerec.utils import ImageRecError

    (tmp_path / "a.jpg").write_bytes(jpegs[0])
    out = tmp_path / "preds.txt"
    with pytest.raises(ImageRecError, match=r"--resume needs --format json, csv or parquet"):
        run_predict(str(tiny_run), [str(tmp_path / "a.jpg")], fmt="table", output=str(out), resume=True)
    assert not out.exists()
