"""`run_predict()`: the function behind `imagerec predict` — inputs (files, folders, globs,
store:NAME, videos), output formats (table, JSON lines, CSV, Parquet) and `--resume`.

JSON lines and CSV are written row by row and flushed per batch, so an interrupted run loses at
most one batch and `--resume` skips every image already in the output; a last row cut short (no
final newline: kill -9, a full disk) is not a finished prediction, and is dropped and redone. Parquet cannot be
appended to; it is rewritten whole (atomically) at the end, including the resumed rows. In every
format `--resume` keeps one row per input: rows that failed are dropped and predicted again (a
JSON lines or CSV file holding any is first rewritten, atomically, without them).
`--output` never replaces a user's file: one of the inputs, or an existing file that is not a
prediction file of that format, is refused before anything is predicted (`_check_output`).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import itertools
import json
import os
import re
import stat
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from PIL import Image

from imagerec.data.decode import Source
from imagerec.predict import VIDEO_EXTENSIONS, Predictor, broken_link_error, expand_paths, input_name, is_video_path, load
from imagerec.utils import ImageRecError, atomic_write, check_batch_size

__all__ = ["CSV_FIELDS", "FORMATS", "VIDEO_EXTENSIONS", "is_video", "run_predict"]
FORMATS = ("table", "json", "csv", "parquet")
# `labels`: a multi-label model's predicted set (scores >= 0.5), a JSON list; empty for single-label models.
CSV_FIELDS = ["path", "frame", "time_s", "label", "score", "topk", "labels", "error"]
# Text files are UTF-8; a file name that is not (a Latin-1 name from an old archive: Python holds
# its bytes as lone surrogates) is written back as its own bytes, as `ls` shows it, and read back
# the same way by --resume. Parquet strings must be valid UTF-8: there such a name is escaped (`_text`).
TEXT_ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}


def is_video(path: object) -> bool:
    return isinstance(path, str) and is_video_path(path)


def video_frames(path: str, every: int) -> Iterator[tuple[int, float, Image.Image]]:
    """(frame index, time in seconds, RGB frame) for every `every`-th frame of a video.

    A video whose first frame cannot be read (a valid container with no frames, a first frame that
    does not decode) raises ImageRecError: it would otherwise give no row at all, as if it had
    never been given."""
    import cv2

    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise ImageRecError(f"{path}: cannot open video (unsupported codec or not a video file)")
    fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    index = 0
    try:
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
    if index == 0:  # frame 0 is always retrieved: nothing was yielded
        raise ImageRecError(f"{path}: video has no frames (an empty video, or its first frame does not decode)")


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
        yield {"path": path, "error": broken_link_error(path) or str(e)}


Key = tuple[str, Any]


def _decode(data: bytes) -> str:
    return io.TextIOWrapper(io.BytesIO(data), newline="", **TEXT_ENCODING).read()  # as the file was written


def _read_rows(output: Path, fmt: str) -> tuple[list[dict[str, Any]], int | None]:
    """The prediction rows in `output` (each with a `path`), and the line of an unfinished last row
    that was left out (None when there is none), or a clear error for a file that is not a `fmt`
    prediction file (another format, another tool's file, a bad line before the last).

    A write stopped midway (kill -9, a full disk) leaves the last row without its end: a line with no
    final newline, or a CSV record that does not parse into all its fields. That row is not a
    finished prediction; the caller rewrites the file without it and predicts that input again."""
    what = f"cannot resume from {output}: it is not a readable {fmt} prediction file"
    fix = "give --format matching the file, or another --output"
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(output).to_pylist(), None
        data = output.read_bytes()
        cut = data.rfind(b"\n") + 1  # up to the last newline: what follows it is a row cut short
        head, tail = _decode(data[:cut]), data[cut:].decode("utf-8", "replace")
    except (OSError, ValueError) as e:
        raise ImageRecError(f"{what} ({e}); {fix}") from e
    rows, partial = _json_rows(head, tail, what, fix) if fmt == "json" else _csv_rows(head, tail, what, fix)
    for line, r in rows:
        if not isinstance(r, dict) or not isinstance(r.get("path"), str):
            raise ImageRecError(f"{what}: line {line} is a row without a path ({str(r)[:80]}); {fix}")
    return [r for _, r in rows], partial


def _json_rows(head: str, tail: str, what: str, fix: str) -> tuple[list[tuple[int, Any]], int | None]:
    """(line number, row) of each finished line (json.dumps escapes newlines: one row is one line)."""
    rows = []
    lines = head.split("\n")
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ImageRecError(f"{what} (line {n}: {e.msg}, column {e.colno}); {fix}") from e
    if not tail.strip():
        return rows, None
    try:
        last = json.loads(tail)
    except json.JSONDecodeError:
        last = None  # cut short, as expected
    if not tail.lstrip().startswith("{") or (last is not None and not isinstance(last, dict)):
        raise ImageRecError(f"{what} (line {len(lines)} is not a JSON row: {tail[:60]!r}); {fix}")
    if isinstance(last, dict) and not isinstance(last.get("path"), str):
        raise ImageRecError(f"{what}: line {len(lines)} is a row without a path ({tail[:80]}); {fix}")
    return rows, len(lines)


def _csv_rows(head: str, tail: str, what: str, fix: str) -> tuple[list[tuple[int, Any]], int | None]:
    """(line number, row) of each finished CSV record after the header."""
    text = head + tail
    records: list[tuple[int, list[str]]] = []
    reader = csv.reader(io.StringIO(text, newline=""))  # newline="": a quoted name may hold a line break
    try:
        start = 1
        for rec in reader:
            records.append((start, rec))
            start = reader.line_num + 1
    except csv.Error as e:
        raise ImageRecError(f"{what} (line {start}: {e}); {fix}") from e
    header_line = ",".join(CSV_FIELDS)
    if not records or (len(records) == 1 and not head and header_line.startswith(text)):
        return [], (1 if text else None)  # empty, or the header itself cut short
    header = records[0][1]
    if "path" not in header:
        raise ImageRecError(f"{what} (its first line is {','.join(header)[:60]!r}, not a header with a path column "
                            f"like {header_line}); {fix}")
    partial = None
    # cut short: no final newline, or too few fields (cut after a line break inside a quoted name);
    # one cut inside a quoted error message may look whole, but error rows are predicted again anyway
    if len(records) > 1 and (tail or len(records[-1][1]) != len(header)):
        partial = records.pop()[0]
    for line, rec in records[1:]:
        if len(rec) != len(header):
            raise ImageRecError(f"{what} (line {line} has {len(rec)} fields, the header {len(header)}); {fix}")
    return [(line, dict(zip(header, rec, strict=True))) for line, rec in records[1:]], partial


def _key(r: dict[str, Any]) -> Key:
    frame = r.get("frame")
    return r["path"], None if frame in (None, "") else int(frame)


def _resume_rows(output: Path, fmt: str) -> tuple[set[Key], list[dict[str, Any]], bool]:
    """Keys (path, frame) of the successful rows in `output`, those rows (one per key, the first),
    and whether the file holds anything else (failed or repeated rows, an older CSV header, an
    unfinished last row): then it must be rewritten with only the rows kept before new rows are
    appended, so nothing is ever appended onto a line cut short."""
    if not output.exists():
        return set(), [], False
    rows, partial = _read_rows(output, fmt)
    if partial is not None:
        print(f"resume: line {partial} of {output} is an unfinished row (the write stopped midway); "
              f"it is dropped and that input predicted again", file=sys.stderr)
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
    stale = len(kept) != len(rows) or partial is not None
    if fmt == "csv" and (not rows or list(rows[0]) != CSV_FIELDS):
        stale = True  # an older header, or none at all (an empty file)
    return done, kept, stale


def _rewrite(output: Path, fmt: str, rows: list[dict[str, Any]]) -> None:
    """Replace `output` (JSON lines or CSV) atomically with `rows`."""
    with atomic_write(output, newline="", **TEXT_ENCODING) as f:
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


@contextlib.contextmanager
def _naming(path: Path | None, other_names: bool = False) -> Iterator[None]:
    """Name `path` in an OSError raised while writing it: only open() sets `filename`, so a full disk
    or a file size limit hit by write() or flush() would say "File too large" without saying where.
    `other_names`: also when the error names another file (atomic_write's hidden temp file, a probe),
    which the user never asked for."""
    try:
        yield
    except OSError as e:
        if path is None or (e.filename is not None and not other_names):
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e


class _Writer:
    def __init__(self, fmt: str, out: IO[str] | None, append: bool, path: Path | None = None) -> None:
        self.fmt, self.out, self.path = fmt, out, path
        self.rows: list[dict[str, Any]] = []
        self.csv = csv.writer(out) if fmt == "csv" and out is not None else None
        if self.csv is not None and not append:
            with _naming(path):
                self.csv.writerow(CSV_FIELDS)

    def write(self, r: dict[str, Any]) -> None:
        with _naming(self.path):
            self._write(r)

    def _write(self, r: dict[str, Any]) -> None:
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
            with _naming(self.path):
                self.out.flush()

    def close(self) -> None:
        """Close the output file (never stdout)."""
        if self.out is not None and self.path is not None:
            with _naming(self.path):
                self.out.close()


def _check_parquet_output(path: Path) -> None:
    """Fail now, naming `path`, when it cannot be written (a missing or read-only folder, a folder
    at `path`), as csv and json fail when they open their file: Parquet is written only at the end,
    after every image has been predicted. A probe file beside it is created and removed."""
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    probe = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.probe")
    with _naming(path, other_names=True), open(probe, "xb"):
        pass
    probe.unlink(missing_ok=True)


def _looks_like_predictions(path: Path, fmt: str) -> bool:
    """Whether the regular file at `path` is empty or starts as a `fmt` prediction file from predict
    does: nothing else may be replaced by the predictions (a user's notes, an image, the data)."""
    try:
        if path.stat().st_size == 0:
            return True  # nothing to lose
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return "path" in pq.read_schema(path).names
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except (OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError
        return False
    first, newline, _ = head.partition(b"\n")
    try:
        line = first.decode("utf-8")
    except UnicodeDecodeError:
        return False  # a binary file (an image); a name that is not UTF-8 is never on the first line alone
    if fmt == "json":
        if not newline:  # one row, cut short (kill -9)
            return line.startswith('{"path": ')
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return False
        return isinstance(row, dict) and isinstance(row.get("path"), str)
    if fmt == "csv":
        header = next(csv.reader([line.rstrip("\r")]), [])
        return "path" in header and set(header) <= set(CSV_FIELDS)
    return re.search(r"\t\d{1,3}\.\d%(\t|$)", line) is not None  # a table row: path, label, score, ...


def _check_output(out: Path, fmt: str, items: list[str | Source], resume: bool) -> None:
    """Refuse, before anything is predicted, an --output that would replace a file that is not
    predictions: one of the inputs (by its device and inode, so also through a link), or, without
    --resume (which reads the file and refuses one it cannot), an existing file that is not a `fmt`
    prediction file. A folder, a device or a pipe are left to open() (or the Parquet probe)."""
    try:
        st = out.stat()
    except OSError:
        return  # missing: created; unreadable: open() names it
    if not stat.S_ISREG(st.st_mode):
        return
    for it in items:
        if isinstance(it, str):
            try:
                s = os.stat(it)
            except OSError:
                continue
            if (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino):
                raise ImageRecError(f"--output {out} is one of the inputs ({it}): it would be replaced by the "
                                    "predictions; give another file name for --output")
    if not resume and not _looks_like_predictions(out, fmt):
        kind = "prediction table" if fmt == "table" else f"{fmt} prediction file"
        raise ImageRecError(f"--output {out} exists and is not a {kind}: it would be replaced by the predictions; "
                            f"give a new file name (or an earlier {kind} to replace)")


def _text(value: Any) -> Any:
    """A string as Parquet can hold it (valid UTF-8): a name that is not gets its bad bytes escaped,
    a Latin-1 "café.jpg" as "caf\\xe9.jpg"; other values as they are."""
    if not isinstance(value, str):
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {k: [_text(r.get(k)) for r in rows] for k in ("path", "frame", "time_s", "label", "score", "error")}
    cols["topk"] = [[{**t, "label": _text(t["label"])} for t in r.get("topk", [])] for r in rows]
    labels = [r.get("labels") for r in rows]  # a multi-label model's predicted set; null otherwise
    cols["labels"] = [None if ls is None else [_text(x) for x in ls] for ls in labels]
    # One schema whatever the rows hold: inferred, a column with no value (`error` when every image
    # was read, `labels` of a single-label model, all of them but `path` when none was) got type
    # null, and files of two runs could not be read together (pyarrow.dataset: "cast from string to null").
    schema = pa.schema([("path", pa.string()), ("frame", pa.int64()), ("time_s", pa.float64()),
                        ("label", pa.string()), ("score", pa.float64()), ("error", pa.string()),
                        ("topk", pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())]))),
                        ("labels", pa.list_(pa.string()))])
    with _naming(path, other_names=True), atomic_write(path, "wb") as f:
        pq.write_table(pa.table(cols, schema=schema), f)


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
    max_pixels: int | None = None,
) -> int:
    """Predict `inputs` with the run or bundle `source`; returns the exit code (1 when nothing could be read).
    `max_pixels`: the pixel limit (default: the run's own, as `imagerec eval` applies it).

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
    if resume and fmt == "table":  # a table has no frame or error column, and a name may hold a tab
        raise ImageRecError("--resume needs --format json, csv or parquet: a table file cannot be read back; "
                            "use one of those for an output to resume")
    check_batch_size(batch_size)
    if max_pixels is not None and max_pixels < 1:
        raise ImageRecError(f"--max-pixels must be at least 1, got {max_pixels}")
    items: list[str | Source] = expand_paths(inputs)
    if not items:
        raise ImageRecError(f"no images found in: {' '.join(inputs)} (nor videos: {', '.join(VIDEO_EXTENSIONS)})")
    out_path = Path(output) if output else None
    if out_path is not None:
        _check_output(out_path, fmt, items, resume)
    done, kept, stale = _resume_rows(out_path, fmt) if resume and out_path else (set(), [], False)
    if fmt == "parquet" and out_path is not None:
        _check_parquet_output(out_path)
    predictor = load(source, batch_size=batch_size, device=device, max_pixels=max_pixels)
    if stale and out_path is not None and fmt != "parquet":
        with _naming(out_path):  # failed, repeated and unfinished rows out: each input ends with one row
            _rewrite(out_path, fmt, kept)
    append = bool(resume and out_path and out_path.exists() and fmt != "parquet")
    stream = None if fmt == "parquet" else (open(out_path, "a" if append else "w", newline="", **TEXT_ENCODING)
                                            if out_path else sys.stdout)
    writer = _Writer(fmt, stream, append, out_path)
    writer.rows.extend(kept)
    total = errors = 0
    try:
        # the key each row is written under (a stored image's name is its path and content address);
        # a Parquet file holds a name that is not UTF-8 escaped, as it was written
        key = _text if fmt == "parquet" else str
        pending = [it for it in items if is_video(it) or (key(input_name(it, 0)), None) not in done]
        for k in range(0, len(pending), batch_size):
            # rows in input order: each run of images in the chunk is one batch, each video in its place
            for videos, group in itertools.groupby(pending[k : k + batch_size], key=is_video):
                run = list(group)
                rows = (itertools.chain.from_iterable(predict_video(predictor, str(v), every, top_k) for v in run)
                        if videos else predictor.predict_iter(run, top_k=top_k))
                for r in rows:
                    if videos and (key(r["path"]), r.get("frame")) in done:
                        continue
                    total += 1
                    errors += "error" in r
                    if "error" in r:
                        print(f"error: {r['error']}", file=sys.stderr)
                    writer.write(r)
            writer.flush()
    finally:
        writer.close()
        if fmt == "parquet" and out_path is not None:
            with _naming(out_path):
                _write_parquet(out_path, writer.rows)
    if errors:
        print(f"{errors} of {total} input(s) could not be read", file=sys.stderr)
    if resume and done:
        print(f"resumed: {len(done)} prediction(s) already in {out_path} were kept", file=sys.stderr)
    return 1 if total and errors == total else 0
