"""QA pass 7 (readers): damaged inputs give one error line naming the file, never a traceback.

CIFAR batches of the wrong width, values or type, a meta file without class names or with one name
twice; a CSV manifest row with more fields than its header; an IDX header whose size overflows int64;
archive members with '..' in their names; images over twice Pillow's pixel limit; a stored label that
is not one of its dataset's classes (a real SQLite store); a key given twice in a --config file.
Every input is small and built in a tmp dir.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from imagerec.cli import main
from imagerec.config import load_config_file
from imagerec.data import read_data
from imagerec.data.decode import DecodeError, decode_bytes, open_image
from imagerec.data.idx import read_idx
from imagerec.store import ingest, open_store
from imagerec.utils import ImageRecError

CLASSES = [f"c{i}" for i in range(10)]


def png_bytes(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, 255 - value, value // 2)).save(buf, "PNG")
    return buf.getvalue()


def write_folder(root: Path, classes: tuple[str, ...] = ("a", "b"), per_class: int = 3) -> list[Path]:
    """per_class distinct small PNGs in root/<class>/<i>.png."""
    out = []
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = root / c / f"{i}.png"
            path.write_bytes(png_bytes(40 * k + 10 * i))
            out.append(path)
    return out


# --- bug 5: damaged CIFAR batches -----------------------------------------------------------------


def write_cifar(root: Path, change: Callable[[int, dict], None] | None = None, meta: object = None) -> Path:
    """Two CIFAR-10 data batches of 4 images each and batches.meta, as the originals pickle them;
    `change(k, batch)` damages batch k before it is written, `meta` replaces the meta dict."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in (1, 2):
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        if change:
            change(k, batch)
        (root / f"data_batch_{k}").write_bytes(pickle.dumps(batch, protocol=2))
    meta = meta if meta is not None else {b"label_names": [c.encode() for c in CLASSES]}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def _narrow(k: int, b: dict) -> None:
    if k == 2:
        b[b"data"] = b[b"data"][:, :1024]


def _over_255(k: int, b: dict) -> None:
    if k == 2:
        b[b"data"] = [[300] * 3072] * 4


def _as_bytes(k: int, b: dict) -> None:
    if k == 2:
        b[b"data"] = b"abc"


@pytest.mark.parametrize(("change", "meta", "file", "says"), [
    (_narrow, None, "data_batch_2", r"CIFAR data must be N x 3072 uint8 rows .*got uint8 values of shape \(4, 1024\)"),
    (_over_255, None, "data_batch_2", r"CIFAR data must be uint8 values 0-255, found values from 300 to 300"),
    (_as_bytes, None, "data_batch_2", r"CIFAR data must be N x 3072 uint8 rows .*got a bytes object"),
    (None, {b"names": [b"x"]}, "batches.meta", r"CIFAR meta must hold 'label_names', a list of class names; found keys \['names'\]"),
    (None, {b"label_names": [b"x"] * 10}, "batches.meta", r"'label_names' names a class more than once \('x'\)"),
])
def test_damaged_cifar_batches_are_one_error_naming_the_file(
    tmp_path: Path, change: Callable | None, meta: dict | None, file: str, says: str
) -> None:
    root = write_cifar(tmp_path / "cifar-10-batches-py", change, meta)
    with pytest.raises(ImageRecError, match=says) as info:
        read_data(str(root))
    assert str(info.value).startswith(f"{root / file}: ")


def test_duplicate_cifar_class_names_are_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """They trained the whole run and failed at the final evaluation, with no metrics.json."""
    root = write_cifar(tmp_path / "cifar-10-batches-py", meta={b"label_names": [b"cat", b"dog"] * 5})
    out = tmp_path / "run"
    code = main(["train", str(root), "--epochs", "1", "--num-threads", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code != 0
    assert f"{root / 'batches.meta'}: 'label_names' names a class more than once ('cat', 'dog')" in err
    assert "Traceback" not in err
    assert not (out / "best.json").exists() and not (out / "last.json").exists()


def test_cifar_values_within_0_255_in_a_wider_integer_type_are_read(tmp_path: Path) -> None:
    """The range check refuses 300, not int64 rows of valid values (lists of Python ints)."""
    def as_lists(k: int, b: dict) -> None:
        b[b"data"] = b[b"data"].astype(np.int64).tolist()

    spec = read_data(str(write_cifar(tmp_path / "cifar-10-batches-py", as_lists)))
    assert spec.counts() == {"train": 8}
    assert spec.arrays["train"].dtype == np.uint8


# --- bug 6: CSV rows with more fields than the header ---------------------------------------------


def test_csv_with_unrecognised_columns_and_trailing_commas_names_the_columns(tmp_path: Path) -> None:
    write_folder(tmp_path / "imgs")
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,category\nimgs/a/0.png,a,\nimgs/b/0.png,b,\n")  # Excel's trailing commas
    with pytest.raises(ImageRecError) as info:
        read_data(str(manifest))
    assert str(info.value) == (f"{manifest}, row 1: needs a 'path' and a 'label' column/key; "
                               "found ['category', 'image'] (and 1 unnamed extra field(s))")


def test_csv_row_with_an_unquoted_comma_is_refused_naming_the_row(tmp_path: Path) -> None:
    write_folder(tmp_path / "imgs")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nimgs/a/0.png,a\nimgs/b/0.png,golden retriever, large\n")
    with pytest.raises(ImageRecError, match=r"row 2: 3 fields but the header names 2 columns \(path, label\); "
                                            r"the extra field\(s\) ' large' are not read") as info:
        read_data(str(manifest))
    assert str(info.value).startswith(f"{manifest}, row 2: ")


def test_csv_trailing_empty_fields_are_still_read(tmp_path: Path) -> None:
    """An empty extra field holds nothing to lose: Excel's trailing commas stay readable."""
    write_folder(tmp_path / "imgs")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nimgs/a/0.png,a,\nimgs/b/0.png,b,,\n")
    spec = read_data(str(manifest))
    assert spec.class_names == ["a", "b"] and spec.counts() == {"train": 2}


# --- bug 9: an IDX header whose size overflows int64 ----------------------------------------------


@pytest.mark.parametrize("dims", [(65536, 65536, 65536, 65536), (0, 2**32 - 1, 2**32 - 1, 2**32 - 1)])
def test_idx_header_too_large_for_any_array_is_one_error(tmp_path: Path, dims: tuple[int, ...]) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims))
    with pytest.raises(ImageRecError, match=rf"^{path}: IDX header says \({dims[0]}, ") as info:
        read_idx(path)
    assert "18446744073709551616" in str(info.value) or "no array can hold" in str(info.value)


# --- bug 12: archive members with '..' in their names ---------------------------------------------


def test_zip_whose_members_all_have_dotdot_says_why_no_image_is_read(tmp_path: Path) -> None:
    archive = tmp_path / "up.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for c in ("a", "b"):
            for i in range(3):
                zf.writestr(f"../x/{c}/{i}.png", png_bytes(10 * i))
    with pytest.raises(ImageRecError) as info:
        read_data(str(archive))
    msg = str(info.value)
    assert msg.startswith(f"{archive}: no images in class folders; the archive's 6 image member(s) with '..'")
    assert "'../x/a/0.png'" in msg and "no images found in class folders" not in msg


def test_tar_member_with_dotdot_is_left_out_with_a_note_naming_it(tmp_path: Path) -> None:
    archive = tmp_path / "some.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for path in write_folder(tmp_path / "imgs"):
            tf.add(path, path.relative_to(tmp_path / "imgs").as_posix())
        tf.add(tmp_path / "imgs" / "a" / "0.png", "../../evil/a/0.png")
    spec = read_data(str(archive))
    assert spec.counts() == {"train": 6}
    assert f"{archive}: left out 1 image member(s) whose names contain '..'" in "\n".join(spec.notes)
    assert any(n.endswith(": ../../evil/a/0.png") for n in spec.notes)


# --- bug 10: images over twice Pillow's pixel limit -----------------------------------------------


def huge_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height 1-bit pixels, with one tiny IDAT: bytes, not gigabytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [10000, 14000, 20000])  # under, just over and far over 2 x PIL's limit
def test_every_image_over_the_limit_gets_imagerecs_message_naming_max_pixels(tmp_path: Path, side: int) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(huge_png(side, side))
    with pytest.raises(DecodeError) as info:
        open_image(str(path))
    assert str(info.value) == (
        f"{path}: {side}x{side} = {side * side} pixels exceeds the limit of 89478485 (possible decompression bomb); "
        "if the image is genuine, raise the limit with --max-pixels N (train, predict, check; max_pixels= in Python); "
        "eval, robustness and export apply the limit the run was trained with"
    )
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # PIL's global is put back


def test_max_pixels_still_lets_a_genuine_large_image_open() -> None:
    with pytest.raises(DecodeError) as info:  # opened past the limit, then read: a truncated stream
        decode_bytes(huge_png(20000, 20000), "big.png", max_pixels=500_000_000)
    assert "exceeds the limit" not in str(info.value) and "DecompressionBomb" not in str(info.value)


# --- bug 8: a stored label that is not one of the dataset's classes -------------------------------


def test_store_label_outside_the_class_names_is_one_error_naming_it(tmp_path: Path) -> None:
    write_folder(tmp_path / "g")
    url = str(tmp_path / "s.db")
    with open_store(url) as store:
        ingest(store, str(tmp_path / "g"), "pets", progress=False)
    engine = sa.create_engine(f"sqlite:///{url}")
    with engine.begin() as conn:
        path = conn.execute(sa.text("select original_path from images where id = 1")).scalar_one()
        conn.execute(sa.text("update images set labels = '[\"zz\"]' where id = 1"))
    engine.dispose()
    with pytest.raises(ImageRecError) as info:
        read_data("store:pets", store_url=url)
    msg = str(info.value)
    assert msg.startswith("dataset 'pets' in the store ") and f", image {path}: label 'zz' is not one of" in msg
    assert "the dataset's 2 classes (a, b)" in msg


# --- bug 11: a key given twice in a --config file -------------------------------------------------


@pytest.mark.parametrize(("text", "says"), [
    ("epochs: 1\nlr: 0.1\nepochs: 2\n", "key 'epochs' is given on lines 1 and 3; keep one of them"),
    ("batch-size: 8\nbatch_size: 4\n", "keys 'batch-size' and 'batch_size' (one setting) are given on lines 1 and 2"),
    ('{"epochs": 1, "epochs": 2}\n', "key 'epochs' is given twice on line 1"),
])
def test_config_key_given_twice_is_refused_with_its_lines(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ImageRecError) as info:
        load_config_file(path)
    assert str(info.value).startswith(f"config file {path}: {says}")


def test_config_without_repeats_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nbatch-size: 8\nlr: 0.05\n")
    cfg = load_config_file(path)
    assert (cfg.epochs, cfg.batch_size, cfg.lr) == (3, 8, 0.05)
