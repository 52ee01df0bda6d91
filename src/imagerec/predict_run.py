"""`run_predict()`: the function behind `imagerec predict` — inputs (files, folders, globs,
store:NAME, videos), output formats (table, JSON lines, CSV, Parquet) and `--resume`.

JSON lines and CSV are written row by row and flushed per batch, so an interrupted run loses at
most one batch and `--resume` skips every image already in the output. Parquet cannot be
appended to; it is rewritten whole (atomically) at the end, including the resumed rows.
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
from imagerec.predict import Predictor, expand_paths, load
from imagerec.utils import ImageRecError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm")
FORMATS = ("table", "json", "csv", "parquet")
CSV_FIELDS = ["path", "frame", "time_s", "label", "score", "topk", "error"]


def is_video(path: object) -> bool:
    return isinstance(path, str) and path.lower().endswith(VIDEO_EXTENSIONS)


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


def _done_keys(output: Path, fmt: str) -> tuple[set[tuple[str, Any]], list[dict[str, Any]]]:
    """Keys (path, frame) of successful rows already in `output`, and the rows themselves."""
    if not output.exists():
        return set(), []
    rows: list[dict[str, Any]]
    try:
        if fmt == "json":
            rows = [json.loads(line) for line in output.read_text().splitlines() if line.strip()]
        elif fmt == "csv":
            rows = list(csv.DictReader(output.read_text().splitlines()))
            for r in rows:
                r["frame"] = int(r["frame"]) if r.get("frame") not in (None, "") else None
        else:
            import pyarrow.parquet as pq

            rows = pq.read_table(output).to_pylist()
    except (json.JSONDecodeError, OSError, ValueError, KeyError) as e:
        raise ImageRecError(f"cannot resume from {output}: it is not a readable {fmt} prediction file ({e})") from e
    good = [r for r in rows if not r.get("error")]
    return {(r["path"], r.get("frame")) for r in good}, good


def _csv_row(r: dict[str, Any]) -> list[Any]:
    # JSON, not "label:score;...": class names may hold any character (a folder named "a:b;c")
    topk = json.dumps([[t["label"], round(t["score"], 4)] for t in r.get("topk", [])], ensure_ascii=False)
    return [r["path"], r.get("frame", ""), r.get("time_s", ""), r.get("label", ""), r.get("score", ""), topk, r.get("error", "")]


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
            self.out.write(f"{r['path']}{where}\t{r['label']}\t{r['score']:.1%}\t{alts}\n")

    def flush(self) -> None:
        if self.out is not None:
            self.out.flush()


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {k: [r.get(k) for r in rows] for k in ("path", "frame", "time_s", "label", "score", "error")}
    cols["topk"] = [r.get("topk", []) for r in rows]
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table(cols), tmp)
    tmp.replace(path)


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
    items: list[str | Source] = expand_paths(inputs)
    if not items:
        raise ImageRecError(f"no images found in: {' '.join(inputs)}")
    out_path = Path(output) if output else None
    done, kept = _done_keys(out_path, fmt) if resume and out_path else (set(), [])
    predictor = load(source, batch_size=batch_size, device=device)
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
