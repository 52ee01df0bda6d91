"""`run_predict()`: the function behind `imagerec predict` — inputs (files, folders, globs,
store:NAME, videos), output formats (table, JSON lines, CSV, Parquet) and `--resume`.

JSON lines and CSV are written row by row and flushed per batch, so an interrupted run loses at
most one batch and `--resume` skips every image already in the output. Parquet cannot be
appended to; it is rewritten whole (atomically) at the end, including the resumed rows. In every
format `--resume` keeps one row per input: rows that failed are dropped and predicted again (a
JSON lines or CSV file holding any is first rewritten, atomically, without them).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from PIL import Image

from imagerec.data.decode import Source
from imagerec.predict import VIDEO_EXTENSIONS, Predictor, expand_paths, is_video_path, load
from imagerec.utils import ImageRecError, atomic_write, check_batch_size

__all__ = ["CSV_FIELDS", "FORMATS", "VIDEO_EXTENSIONS", "is_video", "run_predict"]
FORMATS = ("table", "json", "csv", "parquet")
# `labels`: a multi-label model's predicted set (scores >= 0.5), a JSON list; empty for single-label models.
CSV_FIELDS = ["path", "frame", "time_s", "label", "score", "topk", "labels", "error"]


def is_video(path: object) -> bool:
    return isinstance(path, str) and is_video_path(path)


def video_frames(path: str, every: int) -> Iterator[tuple[int, float, Image.Image]]:
    """(frame index, time in seconds, RGB frame) for every `every`-th frame of a video."""
    import cv2

    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise ImageRecError(f"{path}: cannot open video (unsupported codec or not a video file)")
    fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    try:
        index = 0
        while True:
            if not cap.grab():
                break
            if index % every == 0:
                ok, frame = cap.retrieve()
                if not ok:
                    break
                t = index / fps if fps > 0 else float(index)
                yield index, round(t, 3), Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            index += 1
    finally:
        cap.release()


def predict_video(predictor: Predictor, path: str, every: int, top_k: int, chunk: int = 32) -> Iterator[dict[str, Any]]:
    """Frame-by-frame predictions with `frame` and `time_s` keys."""
    buf: list[tuple[int, float, Image.Image]] = []

    def flush() -> Iterator[dict[str, Any]]:
        results = predictor.predict_iter([im for _, _, im in buf], top_k, names=[path] * len(buf))
        for (idx, t, _), r in zip(buf, results, strict=True):
            yield {**r, "frame": idx, "time_s": t}
        buf.clear()

    try:
        for item in video_frames(path, every):
            buf.append(item)
            if len(buf) == chunk:
                yield from flush()
        yield from flush()
    except ImageRecError as e:
        yield {"path": path, "error": str(e)}


Key = tuple[str, Any]


def _read_rows(output: Path, fmt: str) -> list[dict[str, Any]]:
    """The prediction rows in `output` (each with a `path`), or a clear error for a file that is not
    a `fmt` prediction file (another format, another tool's file)."""
    what = f"cannot resume from {output}: it is not a readable {fmt} prediction file"
    try:
        if fmt == "json":  # json.dumps escapes newlines, so one row is one line
            rows = [json.loads(line) for line in output.read_text().split("\n") if line.strip()]
        elif fmt == "csv":
            with open(output, newline="") as f:  # newline="": a quoted name may hold a line break
                reader = csv.DictReader(f)
                rows = list(reader)
                if "path" not in (reader.fieldnames or []):
                    head = ",".join(reader.fieldnames or [])
                    raise ImageRecError(f"{what} (its first line is {head[:60]!r}, not a header with a path column "
                                        f"like {','.join(CSV_FIELDS)}); give --format matching the file, or another --output")
        else:
            import pyarrow.parquet as pq

            rows = pq.read_table(output).to_pylist()
    except (json.JSONDecodeError, OSError, ValueError, csv.Error) as e:
        raise ImageRecError(f"{what} ({e}); give --format matching the file, or another --output") from e
    bad = next((r for r in rows if not isinstance(r, dict) or not isinstance(r.get("path"), str)), None)
    if bad is not None:
        raise ImageRecError(f"{what}: a row without a path ({str(bad)[:80]}); give --format matching the file, "
                            f"or another --output")
    return rows


def _key(r: dict[str, Any]) -> Key:
    frame = r.get("frame")
    return r["path"], None if frame in (None, "") else int(frame)


def _resume_rows(output: Path, fmt: str) -> tuple[set[Key], list[dict[str, Any]], bool]:
    """Keys (path, frame) of the successful rows in `output`, those rows (one per key, the first),
    and whether the file holds anything else (failed or repeated rows, an older CSV header): then
    it must be rewritten with only the rows kept before new rows are appended."""
    if not output.exists():
        return set(), [], False
    rows = _read_rows(output, fmt)
    done: set[Key] = set()
    kept = []
    for r in rows:
        try:
            key = _key(r)
        except (TypeError, ValueError) as e:
            raise ImageRecError(f"cannot resume from {output}: frame {r.get('frame')!r} of {r['path']} is not a "
                                f"frame number; give another --output") from e
        if not r.get("error") and key not in done:
            done.add(key)
            kept.append(r)
    stale = len(kept) != len(rows)
    if fmt == "csv" and rows and list(rows[0]) != CSV_FIELDS:
        stale = True
    return done, kept, stale


def _rewrite(output: Path, fmt: str, rows: list[dict[str, Any]]) -> None:
    """Replace `output` (JSON lines or CSV) atomically with `rows`."""
    with atomic_write(output, newline="") as f:
        if fmt == "json":
            f.writelines(json.dumps(r) + "\n" for r in rows)
        else:
            w = csv.writer(f)
            w.writerow(CSV_FIELDS)
            w.writerows([r.get(k) or "" for k in CSV_FIELDS] for r in rows)  # cells as read: already text


def _csv_row(r: dict[str, Any]) -> list[Any]:
    # JSON, not "label:score;...": class names may hold any character (a folder named "a:b;c")
    topk = json.dumps([[t["label"], round(t["score"], 4)] for t in r.get("topk", [])], ensure_ascii=False)
    labels = json.dumps(r["labels"], ensure_ascii=False) if "labels" in r else ""
    return [r["path"], r.get("frame", ""), r.get("time_s", ""), r.get("label", ""), r.get("score", ""), topk, labels,
            r.get("error", "")]


class _Writer:
    def __init__(self, fmt: str, out: IO[str] | None, append: bool) -> None:
        self.fmt, self.out = fmt, out
        self.rows: list[dict[str, Any]] = []
        self.csv = csv.writer(out) if fmt == "csv" and out is not None else None
        if self.csv is not None and not append:
            self.csv.writerow(CSV_FIELDS)

    def write(self, r: dict[str, Any]) -> None:
        if self.fmt == "parquet":
            self.rows.append(r)
        elif self.out is None:
            return
        elif self.fmt == "json":
            self.out.write(json.dumps(r) + "\n")
        elif self.csv is not None:
            self.csv.writerow(_csv_row(r))
        elif "error" not in r:
            where = f"@{r['time_s']}s" if "time_s" in r else ""
            alts = "  ".join(f"{t['label']} {t['score']:.1%}" for t in r["topk"][1:])
            labels = f"\tlabels: {', '.join(r['labels']) or '(none >= 50%)'}" if "labels" in r else ""
            self.out.write(f"{r['path']}{where}\t{r['label']}\t{r['score']:.1%}\t{alts}{labels}\n")

    def flush(self) -> None:
        if self.out is not None:
            self.out.flush()


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {k: [r.get(k) for r in rows] for k in ("path", "frame", "time_s", "label", "score", "error")}
    cols["topk"] = [r.get("topk", []) for r in rows]
    cols["labels"] = [r.get("labels") for r in rows]  # a multi-label model's predicted set; null otherwise
    with atomic_write(path, "wb") as f:
        pq.write_table(pa.table(cols), f)


def run_predict(
    source: str,
    inputs: list[str],
    top_k: int = 5,
    fmt: str = "table",
    output: str | None = None,
    resume: bool = False,
    every: int = 1,
    batch_size: int = 64,
    device: str = "auto",
) -> int:
    """Predict `inputs` with the run or bundle `source`; returns the exit code (1 when nothing could be read).

    Example:
        >>> run_predict("runs/mnist", ["digits/", "clip.mp4"], fmt="csv", output="preds.csv", every=10)
    """
    if fmt not in FORMATS:
        raise ImageRecError(f"unknown format '{fmt}': use one of {', '.join(FORMATS)}")
    if top_k < 1 or every < 1:
        raise ImageRecError(f"--top-k and --every must be at least 1, got {top_k} and {every}")
    if fmt == "parquet" and not output:
        raise ImageRecError("--format parquet needs --output FILE")
    if resume and not output:
        raise ImageRecError("--resume needs --output FILE (the file whose predictions are kept)")
    check_batch_size(batch_size)
    items: list[str | Source] = expand_paths(inputs)
    if not items:
        raise ImageRecError(f"no images found in: {' '.join(inputs)} (nor videos: {', '.join(VIDEO_EXTENSIONS)})")
    out_path = Path(output) if output else None
    done, kept, stale = _resume_rows(out_path, fmt) if resume and out_path else (set(), [], False)
    predictor = load(source, batch_size=batch_size, device=device)
    if stale and out_path is not None and fmt != "parquet":
        _rewrite(out_path, fmt, kept)  # failed and repeated rows out: each input ends with one row
    append = bool(resume and out_path and out_path.exists() and fmt != "parquet")
    stream = None if fmt == "parquet" else (open(out_path, "a" if append else "w", newline="") if out_path else sys.stdout)
    writer = _Writer(fmt, stream, append)
    writer.rows.extend(kept)
    total = errors = 0
    try:
        pending = [it for it in items if is_video(it) or (str(it), None) not in done]
        for k in range(0, len(pending), batch_size):
            chunk = pending[k : k + batch_size]
            images = [it for it in chunk if not is_video(it)]
            for r in predictor.predict_iter(images, top_k=top_k):
                total += 1
                errors += "error" in r
                if "error" in r:
                    print(f"error: {r['error']}", file=sys.stderr)
                writer.write(r)
            for video in (it for it in chunk if is_video(it)):
                for r in predict_video(predictor, str(video), every, top_k):
                    if (r["path"], r.get("frame")) in done:
                        continue
                    total += 1
                    errors += "error" in r
                    if "error" in r:
                        print(f"error: {r['error']}", file=sys.stderr)
                    writer.write(r)
            writer.flush()
    finally:
        if stream is not None and out_path is not None:
            stream.close()
        if fmt == "parquet" and out_path is not None:
            _write_parquet(out_path, writer.rows)
    if errors:
        print(f"{errors} of {total} input(s) could not be read", file=sys.stderr)
    if resume and done:
        print(f"resumed: {len(done)} prediction(s) already in {out_path} were kept", file=sys.stderr)
    return 1 if total and errors == total else 0
