"""predict's outputs: Parquet, --output FILE --resume, videos frame by frame, store:NAME inputs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import imagerec
from imagerec.data import read_data
from imagerec.predict_run import run_predict
from imagerec.utils import ImageRecError


@pytest.fixture(scope="module")
def run_and_digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[str]]:
    root = tmp_path_factory.mktemp("pred")
    run = imagerec.train(data="mnist-mini", out=str(root / "run"), epochs=2, limit_train=2000).run_dir
    spec = read_data("mnist-mini")
    paths, labels = [], []
    for k, it in enumerate(spec.splits["test"][::50]):
        p = root / "digits" / f"{k:02d}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(spec.arrays["test"][it.source.index]).save(p)
        paths.append(p)
        labels.append(spec.class_names[it.target])
    return run, paths, labels


def test_parquet_output_matches_json(run_and_digits, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    run, paths, _ = run_and_digits
    assert run_predict(str(run), [str(paths[0].parent)], fmt="parquet", output=str(tmp_path / "p.parquet")) == 0
    rows = pq.read_table(tmp_path / "p.parquet").to_pylist()
    run_predict(str(run), [str(paths[0].parent)], fmt="json")
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(r["path"], r["label"]) for r in rows] == [(r["path"], r["label"]) for r in lines]
    assert rows[0]["topk"][0]["label"] == rows[0]["label"] and len(rows) == len(paths)


@pytest.mark.parametrize("fmt,suffix", [("json", "jsonl"), ("csv", "csv"), ("parquet", "parquet")])
def test_resume_skips_what_is_already_in_the_output(run_and_digits, tmp_path: Path, fmt: str, suffix: str) -> None:  # type: ignore[no-untyped-def]
    run, paths, _ = run_and_digits
    out = tmp_path / f"preds.{suffix}"
    run_predict(str(run), [str(p) for p in paths[:8]], fmt=fmt, output=str(out))
    before = out.read_bytes()
    run_predict(str(run), [str(paths[0].parent)], fmt=fmt, output=str(out), resume=True)
    if fmt == "parquet":
        rows = pq.read_table(out).to_pylist()
    elif fmt == "json":
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert out.read_bytes().startswith(before)  # appended, the first 8 rows untouched
    else:
        import csv

        rows = list(csv.DictReader(out.read_text().splitlines()))
        assert out.read_bytes().startswith(before)
    names = [r["path"] for r in rows]
    assert sorted(names) == sorted(str(p) for p in paths)  # every image exactly once
    assert len(set(names)) == len(names)


def test_resume_needs_output_and_parquet_needs_output(run_and_digits) -> None:  # type: ignore[no-untyped-def]
    run, paths, _ = run_and_digits
    with pytest.raises(ImageRecError, match="--resume needs --output"):
        run_predict(str(run), [str(paths[0])], resume=True)
    with pytest.raises(ImageRecError, match="parquet needs --output"):
        run_predict(str(run), [str(paths[0])], fmt="parquet")


def test_video_frames_with_time_stamps(run_and_digits, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    run, paths, labels = run_and_digits
    video = tmp_path / "digits.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (112, 112))
    assert writer.isOpened()
    order = []
    for p, label in zip(paths[:6], labels[:6], strict=True):  # each digit held for 5 frames (0.5 s)
        frame = cv2.cvtColor(np.asarray(Image.open(p).resize((112, 112))), cv2.COLOR_GRAY2BGR)
        for _ in range(5):
            writer.write(frame)
            order.append(label)
    writer.release()
    assert run_predict(str(run), [str(video)], fmt="json", every=5) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["frame"] for r in rows] == [0, 5, 10, 15, 20, 25]
    assert [r["time_s"] for r in rows] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    direct = [r["label"] for r in imagerec.load(run).predict(paths[:6])]
    agree = sum(r["label"] == d for r, d in zip(rows, direct, strict=True))
    assert agree >= 5  # mp4 compression may flip a borderline digit, not the video path itself


def test_store_dataset_as_predict_input(run_and_digits, tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from collections import Counter

    from imagerec.store import ingest, open_store

    run, _, _ = run_and_digits
    monkeypatch.setenv("IMAGEREC_DB", str(tmp_path / "s.db"))
    with open_store() as store:
        ingest(store, "mnist-mini", "mini", split="test", progress=False)
    assert run_predict(str(run), ["store:mini"], fmt="json") == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 1000 and not any("error" in r for r in rows)
    assert all(r["path"].startswith("store:") for r in rows)
    spec = read_data("mnist-mini")
    direct = imagerec.load(run).predict([Image.fromarray(a) for a in spec.arrays["test"]])
    assert Counter(r["label"] for r in rows) == Counter(r["label"] for r in direct)  # same images, same answers


def test_csv_topk_parses_back_whatever_the_class_names(run_and_digits, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import csv
    import io

    from imagerec.predict_run import CSV_FIELDS, _csv_row

    run, paths, _ = run_and_digits
    run_predict(str(run), [str(p) for p in paths[:3]], fmt="csv", output=str(tmp_path / "p.csv"), top_k=3)
    run_predict(str(run), [str(p) for p in paths[:3]], fmt="json", top_k=3)
    want = [[[t["label"], round(t["score"], 4)] for t in json.loads(x)["topk"]] for x in capsys.readouterr().out.splitlines()]
    assert [json.loads(r["topk"]) for r in csv.DictReader(io.StringIO((tmp_path / "p.csv").read_text()))] == want
    odd = {"path": "x.png", "label": "a:b;c", "score": 0.5,
           "topk": [{"label": "a:b;c", "score": 0.5}, {"label": 'd,"e";f:0.1', "score": 0.25}]}
    buf = io.StringIO()
    csv.writer(buf).writerows([CSV_FIELDS, _csv_row(odd)])
    row = next(csv.DictReader(io.StringIO(buf.getvalue())))
    assert json.loads(row["topk"]) == [["a:b;c", 0.5], ['d,"e";f:0.1', 0.25]]
