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
    import re

    # each stored image is named by where it was ingested from and its content address
    assert all(re.fullmatch(r"\S+ \(store:[0-9a-f]{64}\)", r["path"]) for r in rows), rows[0]["path"]
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


# --- deploy-path fixes: resume, folders with videos, multi-label sets, batch sizes, broken pipes ----------


def _write_video(path: Path, frames: int = 10) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (64, 64))
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((64, 64, 3), i * 20, np.uint8))
    writer.release()
    return path


@pytest.mark.parametrize("first,then", [("json", "csv"), ("csv", "json"), ("json", "parquet")])
def test_resume_from_a_file_of_another_format_is_a_clear_error(run_and_digits, tmp_path: Path, first: str, then: str) -> None:  # type: ignore[no-untyped-def]
    run, paths, _ = run_and_digits
    out = tmp_path / "preds.out"
    run_predict(str(run), [str(p) for p in paths[:2]], fmt=first, output=str(out))
    before = out.read_bytes()
    with pytest.raises(ImageRecError, match=f"cannot resume from .*preds.out: it is not a readable {then} prediction file"):
        run_predict(str(run), [str(p) for p in paths[:3]], fmt=then, output=str(out), resume=True)
    assert out.read_bytes() == before  # nothing appended to another format's file


def _rows(out: Path, fmt: str) -> list[dict]:
    import csv

    if fmt == "parquet":
        return pq.read_table(out).to_pylist()
    if fmt == "json":
        return [json.loads(x) for x in out.read_text().split("\n") if x.strip()]
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
def test_resume_keeps_one_row_per_input(run_and_digits, tmp_path: Path, fmt: str) -> None:  # type: ignore[no-untyped-def]
    run, paths, _ = run_and_digits
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "ok.png").write_bytes(paths[0].read_bytes())
    (folder / "new\nline.png").write_bytes(paths[1].read_bytes())
    (folder / "zero.png").write_bytes(b"")  # fails each time: its error row is replaced, not repeated
    out = tmp_path / f"preds.{fmt}"
    run_predict(str(run), [str(folder)], fmt=fmt, output=str(out))
    run_predict(str(run), [str(folder)], fmt=fmt, output=str(out), resume=True)
    (folder / "zero.png").write_bytes(paths[2].read_bytes())  # mended: predicted on the next resume
    run_predict(str(run), [str(folder)], fmt=fmt, output=str(out), resume=True)
    rows = _rows(out, fmt)
    assert sorted(r["path"] for r in rows) == sorted(str(folder / n) for n in ("ok.png", "new\nline.png", "zero.png"))
    assert not any(r.get("error") for r in rows)


def test_folders_include_their_videos(run_and_digits, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    run, paths, _ = run_and_digits
    mixed, only = tmp_path / "mixed", tmp_path / "only"
    mixed.mkdir(), only.mkdir()
    (mixed / "a.png").write_bytes(paths[0].read_bytes())
    _write_video(mixed / "clip.mp4")
    _write_video(only / "clip.mp4")
    assert run_predict(str(run), [str(mixed)], fmt="json", every=5) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(Path(r["path"]).name, r.get("frame")) for r in rows] == [("a.png", None), ("clip.mp4", 0), ("clip.mp4", 5)]
    assert run_predict(str(run), [str(only)], fmt="json", every=5) == 0
    assert [json.loads(x)["frame"] for x in capsys.readouterr().out.splitlines()] == [0, 5]


def test_multi_label_set_is_in_every_format(run_and_digits, tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    import imagerec.predict_run as predict_run

    run, paths, _ = run_and_digits
    predictor = imagerec.load(run)
    predictor.pre = dataclasses.replace(predictor.pre, multi_label=True)  # sigmoid scores: several labels >= 0.5
    monkeypatch.setattr(predict_run, "load", lambda *a, **k: predictor)
    files = [str(p) for p in paths[:4]]
    want = [r["labels"] for r in predictor.predict(files)]
    assert any(len(s) > 1 for s in want)
    run_predict(str(run), files, fmt="csv", output=str(tmp_path / "p.csv"))
    assert [json.loads(r["labels"]) for r in _rows(tmp_path / "p.csv", "csv")] == want
    run_predict(str(run), files, fmt="parquet", output=str(tmp_path / "p.parquet"))
    assert [r["labels"] for r in _rows(tmp_path / "p.parquet", "parquet")] == want
    capsys.readouterr()
    run_predict(str(run), files, fmt="table")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("labels: ")[1] for line in lines] == [", ".join(s) or "(none >= 50%)" for s in want]


@pytest.mark.parametrize("size", [0, -1])
def test_batch_size_below_one_is_refused(run_and_digits, size: int) -> None:  # type: ignore[no-untyped-def]
    from imagerec.engine.evaluate import evaluate_run

    run, paths, _ = run_and_digits
    with pytest.raises(ImageRecError, match=f"batch size must be a whole number of at least 1, got {size}"):
        run_predict(str(run), [str(paths[0])], fmt="csv", batch_size=size)
    with pytest.raises(ImageRecError, match="batch size must be"):
        evaluate_run(run, batch_size=size, write=False)
    with pytest.raises(ImageRecError, match="batch size must be"):
        imagerec.load(run, batch_size=size)


def test_python_predict_refuses_wrong_inputs_with_a_clear_error(run_and_digits) -> None:  # type: ignore[no-untyped-def]
    run, paths, _ = run_and_digits
    predictor = imagerec.load(run)
    for bad in (None, 5, {"a": 1}):
        with pytest.raises(ImageRecError, match=f"cannot predict on a {type(bad).__name__}: give file paths"):
            predictor.predict(bad)  # type: ignore[arg-type]
    with pytest.raises(ImageRecError, match="top_k must be at least 1, got 2.5: give a whole number"):
        predictor.predict(paths[0], top_k=2.5)  # type: ignore[arg-type]
    from_generator = predictor.predict(p for p in paths[:3])
    assert [r["label"] for r in from_generator] == [r["label"] for r in predictor.predict(paths[:3])]


def test_output_into_a_closed_pipe_stops_quietly(run_and_digits, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import os
    import sys

    from imagerec.cli import main

    run, paths, _ = run_and_digits
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (`| head -1`) has gone
    with open(write_end, "w") as pipe:
        monkeypatch.setattr(sys, "stdout", pipe)
        code = main(["predict", str(run), str(paths[0].parent), "--format", "csv", "--batch-size", "4"])
    assert code == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("fmt", ["json", "csv"])
@pytest.mark.parametrize("cut", [1, 7, 30])  # bytes cut off the end: the newline, mid-field, mid-row
def test_resume_redoes_a_last_row_cut_short(run_and_digits, tmp_path: Path, capsys, fmt: str, cut: int) -> None:  # type: ignore[no-untyped-def]
    """kill -9 or a full disk stops the write mid-row: that row is dropped and redone, nothing is glued onto it."""
    run, paths, _ = run_and_digits
    files = [str(p) for p in paths[:6]]
    out = tmp_path / f"preds.{fmt}"
    run_predict(str(run), files[:4], fmt=fmt, output=str(out))
    whole = out.read_bytes()
    out.write_bytes(whole[:-cut])
    capsys.readouterr()
    assert run_predict(str(run), files, fmt=fmt, output=str(out), resume=True) == 0
    err = capsys.readouterr().err
    assert f"line {5 if fmt == 'csv' else 4} of {out} is an unfinished row" in err, err  # the CSV header is line 1
    assert "resumed: 3 prediction(s)" in err
    rows = _rows(out, fmt)
    assert sorted(r["path"] for r in rows) == sorted(files)  # every input once, the cut one redone
    for r in rows:
        assert None not in r and set(r) >= {"path", "label", "topk"}, r  # no row glued onto another
        best = r["topk"][0]["label"] if fmt == "json" else json.loads(r["topk"])[0][0]
        assert best == r["label"]
    assert out.read_bytes().startswith(whole[: whole.rstrip(b"\r\n").rfind(b"\n") + 1])  # the 3 whole rows as they were


def test_resume_redoes_a_csv_row_cut_inside_a_quoted_line_break(run_and_digits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run, paths, _ = run_and_digits
    odd = tmp_path / "in" / "two\nlines.png"
    odd.parent.mkdir()
    odd.write_bytes(paths[1].read_bytes())
    out = tmp_path / "p.csv"
    run_predict(str(run), [str(paths[0]), str(odd)], fmt="csv", output=str(out))
    data = out.read_bytes()
    out.write_bytes(data[: data.index(b"two\n") + 4])  # ends in a newline, inside the quoted name
    run_predict(str(run), [str(paths[0]), str(odd)], fmt="csv", output=str(out), resume=True)
    rows = _rows(out, "csv")
    assert [r["path"] for r in rows] == [str(paths[0]), str(odd)] and all(r["label"] for r in rows)


def test_resume_names_the_line_of_a_bad_row_before_the_last(run_and_digits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run, paths, _ = run_and_digits
    out = tmp_path / "p.json"
    run_predict(str(run), [str(p) for p in paths[:4]], fmt="json", output=str(out))
    lines = out.read_text().splitlines(keepends=True)
    lines[2] = lines[2][:20] + "\n"  # damaged in the middle: not an interruption, so refused
    out.write_text("".join(lines))
    before = out.read_bytes()
    with pytest.raises(ImageRecError, match=r"p.json: it is not a readable json prediction file \(line 3: "):
        run_predict(str(run), [str(p) for p in paths[:5]], fmt="json", output=str(out), resume=True)
    assert out.read_bytes() == before
    out.write_text('{"not": "a prediction"}')  # another tool's one-line file is never emptied
    with pytest.raises(ImageRecError, match="line 1 is a row without a path"):
        run_predict(str(run), [str(paths[0])], fmt="json", output=str(out), resume=True)
    assert out.read_text() == '{"not": "a prediction"}'


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_full_disk_error_names_the_output_file(run_and_digits, tmp_path: Path, fmt: str) -> None:  # type: ignore[no-untyped-def]
    """write() errors carry no file name (only open() sets one): the CLI must still say which file."""
    import subprocess
    import sys
    import textwrap

    run, paths, _ = run_and_digits
    out = tmp_path / f"preds.{fmt}"
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from imagerec.cli import main
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))
        sys.exit(main(["predict", {str(run)!r}, {str(paths[0].parent)!r}, "--format", {fmt!r}, "--output", {str(out)!r}]))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 2, res.stderr
    assert f"error: {out}: File too large" in res.stderr, res.stderr
    assert 0 < out.stat().st_size <= 1500
    run_predict(str(run), [str(paths[0].parent)], fmt=fmt, output=str(out), resume=True)  # then resumes whole
    assert sorted(r["path"] for r in _rows(out, fmt)) == sorted(str(p) for p in paths)


def test_parquet_output_that_cannot_be_written_fails_at_once_naming_it(run_and_digits, tmp_path: Path, monkeypatch,  # type: ignore[no-untyped-def]
                                                                       capsys) -> None:
    # QA: --format parquet --output /nonexist/o.parquet predicted every image first (Parquet is written
    # at the end), then failed naming atomic_write's hidden temp file; csv and json fail at once, naming it.
    import errno
    import os

    import pyarrow.parquet

    from imagerec import predict_run
    from imagerec.cli import main

    run, paths, _ = run_and_digits

    def no_model(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the model was loaded (and images predicted) before the output was checked")

    with monkeypatch.context() as m:
        m.setattr(predict_run, "load", no_model)
        for out, why in ((tmp_path / "missing" / "o.parquet", "No such file or directory"), (tmp_path, "Is a directory")):
            assert main(["predict", str(run), str(paths[0]), "--format", "parquet", "--output", str(out)]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: {out}: {why}; "), err
    assert list(tmp_path.iterdir()) == []  # no probe file left behind

    def full_disk(table, where, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), where.name)  # as the write of the temp file fails

    monkeypatch.setattr(pyarrow.parquet, "write_table", full_disk)
    out = tmp_path / "o.parquet"
    assert main(["predict", str(run), str(paths[0]), "--format", "parquet", "--output", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {out}: No space left on device; ")
    assert list(tmp_path.iterdir()) == []
