"""`imagerec predict --format parquet` writes one schema, whatever its rows hold."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from PIL import Image

from imagerec.predict_run import run_predict


def test_parquet_columns_have_fixed_types_so_files_read_together(tmp_path: Path, untrained_run: Callable[..., Path]) -> None:
    run = untrained_run(tmp_path / "run")
    good = tmp_path / "good.png"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "preds"
    out.mkdir()
    # all read (no error value), and none read (nothing but path and error): types were inferred as null
    assert run_predict(str(run), [str(good)], fmt="parquet", output=str(out / "a.parquet")) == 0
    assert run_predict(str(run), [str(bad)], fmt="parquet", output=str(out / "b.parquet")) == 1
    a, b = pq.read_schema(out / "a.parquet"), pq.read_schema(out / "b.parquet")
    assert a == b
    assert a.field("error").type == pa.string() and a.field("score").type == pa.float64()
    assert a.field("frame").type == pa.int64() and a.field("labels").type == pa.list_(pa.string())
    rows = ds.dataset(out).to_table().to_pylist()  # failed before: "Unsupported cast from string to null"
    assert sorted(r["path"] for r in rows) == sorted([str(good), str(bad)])
