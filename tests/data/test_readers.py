"""Readers on real data (MNIST IDX, the CIFAR-10 JPEG archive) and on generated edge cases:
EMNIST-like IDX, zip/tar/folder layouts, CIFAR python batches, manifests, train/val splits."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagerec.data import DataSpec, Item, open_image, read_data, split_train_val
from imagerec.data.decode import ArrayRef, TarMember, read_bytes, source_name
from imagerec.utils import ImageRecError

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# digit counts of the original MNIST training labels
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
PER_CLASS = 3  # members per (split, class) copied out of the real archive


def write_idx(path: Path, arr: np.ndarray) -> Path:
    """Raw (non-gz) IDX: magic 0, 0, 0x08 (uint8), ndim; big-endian dims; data."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes())
    return path


def png_bytes(color: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


# --- MNIST (real IDX files) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist(shared_datasets: Path) -> DataSpec:
    root = shared_datasets / "mnist"
    if not (root / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not in {root}")
    return read_data(str(root))


def test_mnist_idx_dir(mnist: DataSpec) -> None:
    assert mnist.counts() == {"train": 60000, "test": 10000}
    assert mnist.class_names == [str(d) for d in range(10)]
    assert mnist.arrays["train"].shape == (60000, 28, 28) and mnist.arrays["train"].dtype == np.uint8
    assert mnist.arrays["test"].shape == (10000, 28, 28)
    train, test = mnist.splits["train"], mnist.splits["test"]
    assert train[0].target == 5 and train[1].target == 0 and test[0].target == 7
    assert train[123].source == ArrayRef("train", 123)
    counts = Counter(it.target for it in train)
    assert [counts[d] for d in range(10)] == MNIST_TRAIN_COUNTS
    img = open_image(train[0].source, channels=1, arrays=mnist.arrays)
    assert img.mode == "L" and img.size == (28, 28)
    assert np.array_equal(np.asarray(img), mnist.arrays["train"][0])
    assert np.asarray(img).max() == 255 and np.asarray(img)[0, 0] == 0  # a white digit on black


def test_mnist_split_train_val_is_stratified(mnist: DataSpec) -> None:
    spec = split_train_val(mnist, 0.1, seed=0)
    n_val = sum(round(0.1 * n) for n in MNIST_TRAIN_COUNTS)  # per-class rounding: 5999, not 6000
    assert spec.counts() == {"train": 60000 - n_val, "val": n_val, "test": 10000}
    val = Counter(it.target for it in spec.splits["val"])
    assert [val[d] for d in range(10)] == [round(0.1 * n) for n in MNIST_TRAIN_COUNTS]
    assert spec.splits["test"] is mnist.splits["test"]


def test_idx_emnist_like_labels_start_at_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train_labels = np.repeat(np.arange(1, 27, dtype=np.uint8), 2)  # 52 images, 'a'..'z' as 1..26
    test_labels = rng.permutation(np.arange(1, 27, dtype=np.uint8))
    for split, labels in (("train", train_labels), ("test", test_labels)):
        images = np.broadcast_to((labels * 9)[:, None, None], (len(labels), 28, 28)).copy()
        write_idx(tmp_path / f"emnist-letters-{split}-images-idx3-ubyte", images)
        write_idx(tmp_path / f"emnist-letters-{split}-labels-idx1-ubyte", labels)
    spec = read_data(str(tmp_path))
    assert spec.counts() == {"train": 52, "test": 26}
    assert spec.class_names == [str(v) for v in range(1, 27)]
    assert [it.target for it in spec.splits["train"]] == [int(v) - 1 for v in train_labels]
    assert [it.target for it in spec.splits["test"]] == [int(v) - 1 for v in test_labels]
    for it in spec.splits["test"][:5]:
        img = np.asarray(open_image(it.source, channels=1, arrays=spec.arrays))
        assert (img == (it.target + 1) * 9).all()


def test_truncated_idx_names_the_file(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((10, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(10, np.uint8))
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(ImageRecError, match="train-images-idx3-ubyte") as e:
        read_data(str(tmp_path))
    assert "(10, 28, 28)" in str(e.value)


def test_truncated_gzip_idx_names_the_file(tmp_path: Path) -> None:
    write_idx(tmp_path / "raw", np.zeros((10, 28, 28), np.uint8))
    full = gzip.compress((tmp_path / "raw").read_bytes())
    (tmp_path / "raw").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(full[: len(full) // 2])
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 10]) + bytes(10)))
    with pytest.raises(ImageRecError, match="train-images-idx3-ubyte.gz"):
        read_data(str(tmp_path))


def test_idx_image_label_count_mismatch(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((10, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(9, np.uint8))
    with pytest.raises(ImageRecError, match="10 images but 9 labels"):
        read_data(str(tmp_path))


# --- the CIFAR-10 JPEG archive (real) and the same layout in zip / tar / folders -------------------


@pytest.fixture(scope="module")
def cifar_archive(shared_datasets: Path) -> Path:
    path = shared_datasets / "cifar10-jpg.tar.gz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def cifar_spec(cifar_archive: Path) -> DataSpec:
    return read_data(str(cifar_archive))  # ~4 s: unpacks once into the session cache, lists 60k members


@pytest.fixture(scope="module")
def cifar_members(cifar_archive: Path) -> dict[str, bytes]:
    """The first PER_CLASS files of every (split, class), extracted with tarfile: {name: bytes}."""
    members: dict[str, bytes] = {}
    taken: Counter[tuple[str, str]] = Counter()
    with tarfile.open(cifar_archive, "r|gz") as tf:
        for m in tf:
            parts = m.name.split("/")
            if not m.isfile() or len(parts) != 4 or taken[parts[1], parts[2]] >= PER_CLASS:
                continue
            taken[parts[1], parts[2]] += 1
            members[m.name] = tf.extractfile(m).read()  # type: ignore[union-attr]
            if len(taken) == 20 and min(taken.values()) == PER_CLASS:
                break
    assert len(members) == 2 * 10 * PER_CLASS
    return members


def test_cifar_archive_layout(cifar_spec: DataSpec, imagerec_cache: Path) -> None:
    assert cifar_spec.counts() == {"train": 50000, "test": 10000}
    assert cifar_spec.class_names == CIFAR_CLASSES
    assert cifar_spec.notes == []
    for split, per_class in (("train", 5000), ("test", 1000)):
        items = cifar_spec.splits[split]
        assert Counter(it.target for it in items) == {k: per_class for k in range(10)}
        for it in items:
            _, folder, cls, _ = it.source.name.split("/")
            assert (folder, cls) == (split, CIFAR_CLASSES[it.target])
    # the .tar.gz was unpacked into the session's temp cache, not into ~/.cache
    archive = Path(cifar_spec.splits["train"][0].source.archive)
    assert archive.is_relative_to(imagerec_cache) and archive.suffix == ".tar"


def test_cifar_archive_members_decode(cifar_spec: DataSpec, cifar_members: dict[str, bytes]) -> None:
    by_name = {it.source.name: it for split in cifar_spec.splits.values() for it in split}
    for name, data in list(cifar_members.items())[::7]:
        it = by_name[name]
        assert isinstance(it.source, TarMember)
        assert read_bytes(it.source) == data  # offsets into the cached tar point at the right bytes
        img = open_image(it.source)
        assert img.mode == "RGB" and img.size == (32, 32)
        assert np.array_equal(np.asarray(img), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        assert np.asarray(img).std() > 5  # a real photo, not a blank


def _check_small_cifar(spec: DataSpec, members: dict[str, bytes], splits: tuple[str, ...] = ("train", "test")) -> None:
    """`spec` lists exactly the copied members, each with its class and its original bytes."""
    assert spec.class_names == CIFAR_CLASSES
    assert spec.counts() == {s: 10 * PER_CLASS for s in splits}
    for split, items in spec.splits.items():
        for it in items:
            folder, cls, file = source_name(it.source).replace(os.sep, "/").split("/")[-3:]
            assert SPLIT_NAMES[folder] == split and cls == CIFAR_CLASSES[it.target]
            original = "test" if folder == "valid" else folder
            assert read_bytes(it.source) == members[f"cifar10-jpg/{original}/{cls}/{file}"]  # type: ignore[arg-type]
        first = open_image(items[0].source)
        assert first.mode == "RGB" and first.size == (32, 32)


SPLIT_NAMES = {"train": "train", "test": "test", "valid": "val"}


def extract(members: dict[str, bytes], root: Path, wrapper: bool = True, test_as: str = "test") -> Path:
    """Write members under root (keeping the `cifar10-jpg/` wrapper or not), test/ renamed to `test_as`."""
    for name, data in members.items():
        parts = name.split("/")
        parts[1] = test_as if parts[1] == "test" else parts[1]
        dest = root.joinpath(*(parts if wrapper else parts[1:]))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    return root


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_small_archive_with_wrapper(tmp_path: Path, cifar_members: dict[str, bytes], kind: str) -> None:
    path = tmp_path / f"small.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("__MACOSX/cifar10-jpg/train/cat/._0001.jpg", b"resource fork, not an image")
            for name, data in cifar_members.items():
                zf.writestr(name, data)
    else:
        with tarfile.open(path, "w:gz" if kind == "tar.gz" else "w") as tf:
            for name, data in cifar_members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    spec = read_data(str(path))
    _check_small_cifar(spec, cifar_members)
    assert spec.notes == []


def test_folder_with_split_dirs(tmp_path: Path, cifar_members: dict[str, bytes]) -> None:
    root = extract(cifar_members, tmp_path / "root", wrapper=False)
    spec = read_data(str(root))
    _check_small_cifar(spec, cifar_members)
    assert spec.notes == []
    assert all(Path(it.source).is_relative_to(root) for it in spec.splits["train"])  # type: ignore[arg-type]


def test_folder_with_wrapper_folder(tmp_path: Path, cifar_members: dict[str, bytes]) -> None:
    root = extract(cifar_members, tmp_path / "root")
    spec = read_data(str(root))
    _check_small_cifar(spec, cifar_members)
    assert spec.notes == []  # the wrapper is not reported as an empty class folder


def test_folder_without_val_or_test_is_train_only(tmp_path: Path, cifar_members: dict[str, bytes]) -> None:
    train_only = {k: v for k, v in cifar_members.items() if "/train/" in k}
    spec = read_data(str(extract(train_only, tmp_path / "root", wrapper=False)))
    assert list(spec.splits) == ["train"]
    _check_small_cifar(spec, cifar_members, splits=("train",))


def test_valid_folder_is_val(tmp_path: Path, cifar_members: dict[str, bytes]) -> None:
    spec = read_data(str(extract(cifar_members, tmp_path / "root", wrapper=False, test_as="valid")))
    assert set(spec.splits) == {"train", "val"}
    _check_small_cifar(spec, cifar_members, splits=("train", "val"))
    assert all("/valid/" in str(it.source) for it in spec.splits["val"])
    # split_train_val keeps an existing val split
    assert split_train_val(spec, 0.5, seed=0) is spec


def test_class_folders_without_splits(tmp_path: Path) -> None:
    for cls, color in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
        (tmp_path / cls).mkdir()
        for i in range(3):
            (tmp_path / cls / f"{i}.png").write_bytes(png_bytes(color))
    (tmp_path / "empty").mkdir()
    (tmp_path / "cat" / "readme.txt").write_text("not an image")
    spec = read_data(str(tmp_path))
    assert spec.class_names == ["cat", "dog"] and spec.counts() == {"train": 6}
    assert [it.target for it in spec.splits["train"]] == [0, 0, 0, 1, 1, 1]
    assert np.asarray(open_image(spec.splits["train"][4].source))[0, 0].tolist() == [0, 0, 200]
    assert any("empty" in n for n in spec.notes)


def test_unsupported_and_missing_data(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ImageRecError, match="unsupported file type"):
        read_data(str(tmp_path / "data.txt"))
    with pytest.raises(ImageRecError, match="data not found"):
        read_data(str(tmp_path / "nope"))
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ImageRecError, match="broken.zip"):
        read_data(str(tmp_path / "broken.zip"))


# --- CIFAR python batches (generated in the original format) -------------------------------------


def write_pickle(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))  # the originals are python-2 cPickle files


def cifar_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)  # (N, 3*32*32): R plane, G plane, B plane


def test_cifar10_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = {name: cifar_rows(rng, 6) for name in ("data_batch_1", "data_batch_2", "test_batch")}
    rows["data_batch_1"][0] = np.repeat(np.array([255, 0, 0], np.uint8), 1024)  # image 0 is pure red
    labels = {name: rng.integers(0, 10, 6).tolist() for name in rows}
    for name in rows:
        write_pickle(
            tmp_path / name,
            {b"batch_label": name.encode(), b"labels": labels[name], b"data": rows[name],
             b"filenames": [f"{name}_{i}.png".encode() for i in range(6)]},
        )
    write_pickle(tmp_path / "batches.meta", {b"label_names": [c.encode() for c in CIFAR_CLASSES],
                                            b"num_cases_per_batch": 6, b"num_vis": 3072})
    spec = read_data(str(tmp_path))
    assert spec.counts() == {"train": 12, "test": 6}
    assert spec.class_names == CIFAR_CLASSES
    assert [it.target for it in spec.splits["train"]] == labels["data_batch_1"] + labels["data_batch_2"]
    assert [it.target for it in spec.splits["test"]] == labels["test_batch"]
    assert np.asarray(open_image(spec.splits["train"][0].source, arrays=spec.arrays))[5, 7].tolist() == [255, 0, 0]
    for split, i, row in (("train", 3, rows["data_batch_1"][3]), ("train", 8, rows["data_batch_2"][2]),
                          ("test", 5, rows["test_batch"][5])):
        img = np.asarray(open_image(spec.splits[split][i].source, arrays=spec.arrays))
        assert img.shape == (32, 32, 3)
        for c in range(3):
            assert np.array_equal(img[..., c], row[c * 1024 : (c + 1) * 1024].reshape(32, 32))
        gray = np.asarray(open_image(spec.splits[split][i].source, channels=1, arrays=spec.arrays))
        assert gray.shape == (32, 32)


def test_cifar100_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    fine_names = [f"fine{i:02d}" for i in range(100)]
    data = {"train": cifar_rows(rng, 10), "test": cifar_rows(rng, 4)}
    fine = {s: rng.integers(0, 100, len(d)).tolist() for s, d in data.items()}
    for split, rows in data.items():
        write_pickle(tmp_path / split, {b"filenames": [b"x.png"] * len(rows), b"batch_label": split.encode(),
                                        b"fine_labels": fine[split], b"coarse_labels": [i % 20 for i in fine[split]],
                                        b"data": rows})
    write_pickle(tmp_path / "meta", {b"fine_label_names": [n.encode() for n in fine_names],
                                     b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    spec = read_data(str(tmp_path))
    assert spec.counts() == {"train": 10, "test": 4}
    assert spec.class_names == fine_names
    assert [it.target for it in spec.splits["train"]] == fine["train"]
    assert [it.target for it in spec.splits["test"]] == fine["test"]
    img = np.asarray(open_image(spec.splits["test"][3].source, arrays=spec.arrays))
    assert np.array_equal(img[..., 2], data["test"][3][2048:].reshape(32, 32))


class Payload:
    """Pickles into a call of os.makedirs(marker): proof that unpickling ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.makedirs, (str(self.marker),))


class Plain:
    def __init__(self) -> None:
        self.x = 1


@pytest.mark.parametrize("bad", ["payload", "instance", "function"])
@pytest.mark.parametrize("where", ["data_batch_1", "batches.meta"])
def test_cifar_pickle_with_objects_is_refused(tmp_path: Path, bad: str, where: str) -> None:
    marker = tmp_path / "code-ran"
    evil = {"payload": Payload(marker), "instance": Plain(), "function": os.system}[bad]
    good = {b"data": cifar_rows(np.random.default_rng(0), 2), b"labels": [0, 1]}
    write_pickle(tmp_path / "data_batch_1", {**good, b"extra": evil} if where == "data_batch_1" else good)
    write_pickle(tmp_path / "test_batch", good)
    meta = {b"label_names": [b"a", b"b"]}
    write_pickle(tmp_path / "batches.meta", {**meta, b"extra": evil} if where == "batches.meta" else meta)
    with pytest.raises(ImageRecError, match=where) as e:
        read_data(str(tmp_path))
    assert "refusing" in str(e.value)
    assert not marker.exists()
    if bad == "payload":  # the same bytes do run code under a plain pickle.load
        pickle.loads((tmp_path / where).read_bytes())
        assert marker.is_dir()


def test_cifar_batch_with_wrong_shape(tmp_path: Path) -> None:
    write_pickle(tmp_path / "data_batch_1", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ImageRecError, match=r"N x 3072.*\(2, 100\)"):
        read_data(str(tmp_path))


# --- manifests -----------------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """tmp/imgs/{0..5}.png, image i filled with (40*i, 0, 0)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.png").write_bytes(png_bytes((40 * i, 0, 0)))
    return folder


def test_csv_manifest_with_splits(tmp_path: Path, images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "path,label,split\nimgs/0.png,dog,train\nimgs/1.png,cat,train\nimgs/2.png,dog,\n"
        "imgs/3.png,cat,valid\nimgs/4.png,dog,test\n" + f"{images / '5.png'},cat,train\n"
    )
    monkeypatch.chdir(images)  # paths are relative to the manifest, not to the working folder
    spec = read_data(str(manifest))
    assert spec.class_names == ["cat", "dog"] and not spec.multi_label
    assert spec.counts() == {"train": 4, "val": 1, "test": 1}
    assert [(Path(it.source).name, it.target) for it in spec.splits["train"]] == [
        ("0.png", 1), ("1.png", 0), ("2.png", 1), ("5.png", 0)]
    assert spec.splits["val"][0].source == str(tmp_path / "imgs" / "3.png")
    assert np.asarray(open_image(spec.splits["test"][0].source))[0, 0].tolist() == [160, 0, 0]


def test_csv_manifest_multi_label(tmp_path: Path, images: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nimgs/0.png,sky;sea\nimgs/1.png,tree\nimgs/2.png,sea | tree | sky\n")
    spec = read_data(str(manifest))
    assert spec.multi_label and spec.class_names == ["sea", "sky", "tree"]
    assert [it.target for it in spec.splits["train"]] == [(0, 1), (2,), (0, 1, 2)]


def test_jsonl_manifest_labels_list(tmp_path: Path, images: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    rows = [{"path": "imgs/0.png", "labels": ["b", "a"]}, {"path": "imgs/1.png", "labels": ["c"], "split": "test"},
            {"file": "imgs/2.png", "labels": []}]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    spec = read_data(str(manifest))
    assert spec.multi_label and spec.class_names == ["a", "b", "c"]
    assert [it.target for it in spec.splits["train"]] == [(0, 1), ()]
    assert [it.target for it in spec.splits["test"]] == [(2,)]


def test_jsonl_single_labels_are_not_multi_label(tmp_path: Path, images: Path) -> None:
    manifest = tmp_path / "m.ndjson"
    manifest.write_text('{"image": "imgs/0.png", "label": 3}\n{"image": "imgs/1.png", "class": "7"}\n')
    spec = read_data(str(manifest))
    assert not spec.multi_label and spec.class_names == ["3", "7"]
    assert [it.target for it in spec.splits["train"]] == [0, 1]


def test_manifest_missing_files_are_skipped_with_a_note(tmp_path: Path, images: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nimgs/0.png,a\nimgs/gone.png,b\nimgs/1.png,b\n")
    spec = read_data(str(manifest))
    assert [Path(it.source).name for it in spec.splits["train"]] == ["0.png", "1.png"]
    assert len(spec.notes) == 1 and "row 2" in spec.notes[0] and "gone.png" in spec.notes[0]
    many = tmp_path / "many.csv"
    many.write_text("path,label\nimgs/0.png,a\n" + "".join(f"imgs/missing{i}.png,a\n" for i in range(8)))
    notes = read_data(str(many)).notes
    assert len(notes) == 6 and "8 files" in notes[-1]


def test_manifest_row_without_label(tmp_path: Path, images: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nimgs/0.png,a\nimgs/1.png,a\nimgs/2.png,\n")
    with pytest.raises(ImageRecError, match=r"m\.csv, row 3: the label is empty"):
        read_data(str(manifest))
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text('{"path": "imgs/0.png", "label": "a"}\n{"path": "imgs/1.png"}\n')
    with pytest.raises(ImageRecError, match=r"m\.jsonl, row 2"):
        read_data(str(jsonl))
    jsonl.write_text('{"path": "imgs/0.png", "label": "a"}\n{"path": \n')
    with pytest.raises(ImageRecError, match=r"m\.jsonl, line 2: not valid JSON"):
        read_data(str(jsonl))
    jsonl.write_text('{"path": "imgs/0.png", "label": "a"}\n{"path": "imgs/1.png", "label": null}\n')
    with pytest.raises(ImageRecError, match=r"m\.jsonl, row 2: the label is empty \('label': None\)"):
        read_data(str(jsonl))


def test_manifest_label_of_only_spaces_or_separators_is_empty(tmp_path: Path, images: Path) -> None:
    # ' ' or ';' split into no label at all: refused like '' instead of turning the dataset multi-label
    for label, shown in ((" ", "' '"), (";", "';'"), (" | ", "' | '")):
        manifest = tmp_path / "m.csv"
        manifest.write_text(f"path,label\nimgs/0.png,a\nimgs/1.png,b\nimgs/2.png,{label}\nimgs/3.png,a\n")
        with pytest.raises(ImageRecError, match=rf"m\.csv, row 3: the label is empty \('label': {shown}\)"):
            read_data(str(manifest))
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text('{"path": "imgs/0.png", "label": "a"}\n{"path": "imgs/1.png", "label": "  "}\n')
    with pytest.raises(ImageRecError, match=r"m\.jsonl, row 2: the label is empty"):
        read_data(str(jsonl))


def test_manifest_unknown_split_is_an_error(tmp_path: Path, images: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\nimgs/0.png,a,train\nimgs/1.png,a,holdout\n")
    with pytest.raises(ImageRecError, match=r"m\.csv, row 2: unknown split 'holdout'"):
        read_data(str(manifest))


def test_manifest_where_no_file_exists(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nx.png,a\n")
    with pytest.raises(ImageRecError, match="none of the 1 files"):
        read_data(str(manifest))


# --- split_train_val -----------------------------------------------------------------------------

SIZES = [50, 31, 7, 2, 1]  # items per class, imbalanced on purpose


@pytest.fixture
def unsplit() -> DataSpec:
    items = [Item(f"c{k}/{i}.png", k) for k, n in enumerate(SIZES) for i in range(n)]
    items = [items[i] for i in np.random.default_rng(0).permutation(len(items))]  # classes interleaved
    return DataSpec("mem", [f"c{k}" for k in range(len(SIZES))], {"train": items, "test": items[:3]})


def val_names(spec: DataSpec) -> list[str]:
    return [it.source for it in spec.splits["val"]]  # type: ignore[misc]


def test_split_train_val_is_deterministic_and_seeded(unsplit: DataSpec) -> None:
    a, b, c = (split_train_val(unsplit, 0.2, seed=s) for s in (7, 7, 8))
    assert val_names(a) == val_names(b)
    assert val_names(a) != val_names(c)
    assert a.splits["test"] == unsplit.splits["test"]


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_split_train_val_stratified_and_complete(unsplit: DataSpec, fraction: float) -> None:
    spec = split_train_val(unsplit, fraction, seed=0)
    train, val = spec.splits["train"], spec.splits["val"]
    per_class = Counter(it.target for it in val)
    for k, n in enumerate(SIZES):
        expected = 0 if n < 2 else min(max(round(fraction * n), 1), n - 1)
        assert per_class[k] == expected, (k, n)
        assert abs(per_class[k] - round(fraction * n)) <= 1
    train_names = [it.source for it in train]
    assert not set(train_names) & set(val_names(spec))
    assert sorted(train_names + val_names(spec)) == sorted(it.source for it in unsplit.splits["train"])
    original = [it.source for it in unsplit.splits["train"]]
    assert train_names == [s for s in original if s in set(train_names)]  # listing order kept


def test_split_train_val_noop_cases(unsplit: DataSpec) -> None:
    assert split_train_val(unsplit, 0.0, seed=0) is unsplit
    only_test = DataSpec("mem", ["a"], {"test": unsplit.splits["test"]})
    assert split_train_val(only_test, 0.2, seed=0) is only_test


# --- layouts found by QA (session 14): stray files, symlinks, encodings, bad IDX shapes ---------------


def test_stray_top_level_image_does_not_stop_the_wrapper(tmp_path: Path, cifar_members: dict[str, bytes]) -> None:
    root = extract(cifar_members, tmp_path / "root")  # root/cifar10-jpg/{train,test}/<class>/...
    (root / "cover.png").write_bytes(png_bytes((1, 2, 3)))
    spec = read_data(str(root))
    _check_small_cifar(spec, cifar_members)  # the wrapper is still stripped: 10 classes, train and test
    assert any("ignored 1 image(s) in '(top level)'" in n for n in spec.notes)


def test_symlinked_class_folders_are_read(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    for c, color in (("cat", (200, 0, 0)), ("dog", (0, 200, 0))):
        (elsewhere / c).mkdir(parents=True)
        for i in range(2):
            (elsewhere / c / f"{i}.png").write_bytes(png_bytes((color[0] + i, color[1], i)))
    root = tmp_path / "root"
    (root / "bird").mkdir(parents=True)
    (root / "bird" / "0.png").write_bytes(png_bytes((0, 0, 200)))
    (root / "cat").symlink_to(elsewhere / "cat")
    (root / "dog").symlink_to(elsewhere / "dog")
    (root / "bird" / "loop").symlink_to(root)  # a loop: read once, not forever
    spec = read_data(str(root))
    assert spec.class_names == ["bird", "cat", "dog"]
    assert Counter(spec.class_names[it.target] for it in spec.splits["train"]) == {"bird": 1, "cat": 2, "dog": 2}
    assert spec.notes == []


def test_broken_symlink_is_left_out_with_a_note_naming_it(tmp_path: Path) -> None:
    # a link to nothing is no image, but train and ingest must say which file they go without
    root = tmp_path / "root"
    for c, color in (("cat", (200, 0, 0)), ("dog", (0, 200, 0))):
        (root / c).mkdir(parents=True)
        (root / c / "0.png").write_bytes(png_bytes(color))
    (root / "cat" / "broken.png").symlink_to("/nonexistent/photo.png")
    spec = read_data(str(root))
    assert spec.counts() == {"train": 2}
    assert spec.notes == [f"{root}: left out 1 broken symbolic link(s), whose target does not exist: "
                          "cat/broken.png -> /nonexistent/photo.png; point them at the image or remove them"]


def test_tar_link_members_are_read_as_the_file_they_point_to(tmp_path: Path) -> None:
    # as a symlink in a folder is: a symlink and a hard link member are images; a link to nothing is named
    archive = tmp_path / "links.tar"
    with tarfile.open(archive, "w") as tf:
        for name, color in (("data/cat/0.png", (200, 0, 0)), ("data/dog/0.png", (0, 200, 0))):
            data = png_bytes(color)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, kind, target in (("data/cat/sym.png", tarfile.SYMTYPE, "0.png"),
                                   ("data/dog/hard.png", tarfile.LNKTYPE, "data/dog/0.png"),
                                   ("data/cat/gone.png", tarfile.SYMTYPE, "../missing.png")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tf.addfile(info)
    spec = read_data(str(archive))
    assert spec.counts() == {"train": 4}
    got = {it.source.name: read_bytes(it.source) for it in spec.splits["train"]}  # type: ignore[union-attr]
    assert got["data/cat/sym.png"] == got["data/cat/0.png"] and got["data/dog/hard.png"] == got["data/dog/0.png"]
    assert spec.notes == [f"{archive}: left out 1 broken symbolic link(s), whose target is not a file in the archive: "
                          "data/cat/gone.png -> ../missing.png; point them at the image or remove them"]


def test_manifest_that_is_not_utf8_names_the_file_and_line(tmp_path: Path, images: Path) -> None:
    first = sorted(images.rglob("*.png"))[0]
    path = tmp_path / "labels.csv"
    path.write_bytes(f"path,label\n{first},chat\n{first},caf\xe9\n".encode("latin-1"))
    with pytest.raises(ImageRecError, match=r"labels\.csv, line 3: not UTF-8 text \(byte 0xe9\); save the manifest as UTF-8"):
        read_data(str(path))


@pytest.mark.parametrize(
    ("images_shape", "labels_shape", "bad", "match"),
    [
        ((20, 8, 8), (20, 1), "labels", r"IDX labels must be one integer per image .* shape \(20, 1\)"),
        ((20,), (20,), "images", r"IDX images must be uint8 of shape \(count, height, width\).* shape \(20,\)"),
        ((20, 8, 8, 2), (20,), "images", r"shape \(20, 8, 8, 2\)"),
    ],
)
def test_idx_files_of_the_wrong_shape_are_named(
    tmp_path: Path, images_shape: tuple[int, ...], labels_shape: tuple[int, ...], bad: str, match: str
) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros(images_shape, np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(labels_shape, np.uint8))
    with pytest.raises(ImageRecError, match=match) as info:
        read_data(str(tmp_path))
    assert f"train-{bad}-idx" in str(info.value)


def test_idx_with_float_labels_is_refused(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 8, 8), np.uint8))
    raw = bytes([0, 0, 0x0D, 1]) + (3).to_bytes(4, "big") + np.array([0.5, 1.0, 2.0], ">f4").tobytes()
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(raw)
    with pytest.raises(ImageRecError, match=r"IDX labels must be one integer per image.*float32"):
        read_data(str(tmp_path))


def test_encrypted_zip_member_is_skipped_with_its_name(tmp_path: Path) -> None:
    path = tmp_path / "enc.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for c, color in (("cat", (200, 0, 0)), ("dog", (0, 200, 0))):
            for i in range(2):
                zf.writestr(f"{c}/{i}.png", png_bytes((color[0], color[1], i)))
    raw = bytearray(path.read_bytes())  # flag the first member as encrypted, in both headers
    raw[raw.find(b"PK\x03\x04") + 6] |= 1
    raw[raw.find(b"PK\x01\x02") + 8] |= 1
    path.write_bytes(bytes(raw))
    spec = read_data(str(path))
    first = next(it for it in spec.splits["train"] if it.source.name == "cat/0.png")  # type: ignore[union-attr]
    with pytest.raises(ImageRecError, match=r"enc\.zip::cat/0\.png: cannot read \(RuntimeError: .*encrypted"):
        open_image(first.source)
    assert open_image(spec.splits["train"][1].source).size == (8, 8)  # the others read as before


# --- QA fixes: archives, CIFAR labels, classes without training images, manifest messages ------


def mini_digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n mnist-mini training digits (real images, (n, 28, 28) uint8) and their labels."""
    spec = read_data("mnist-mini")
    return spec.arrays["train"][:n], np.array([it.target for it in spec.splits["train"][:n]])


def test_targz_cache_tolerates_another_process_unpacking_at_the_same_time(
    tmp_path: Path, cifar_members: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two torchrun ranks unpack one .tar.gz on first use: the second one (simulated by a nested call
    while the first is still writing) must neither clobber the first's temp file nor fail."""
    from imagerec.data import archive as archive_reader

    archive = tmp_path / "small.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, data in cifar_members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("IMAGEREC_CACHE", str(tmp_path / "cache"))
    real_copy = archive_reader.shutil.copyfileobj
    calls: list[Path] = []

    def copy_while_another_rank_unpacks(src, dst, length=0):  # type: ignore[no-untyped-def]
        if not calls:
            calls.append(tmp_path)
            calls[0] = archive_reader._ungzip_to_cache(archive)  # the other rank, finishing first
        return real_copy(src, dst, length)

    monkeypatch.setattr(archive_reader.shutil, "copyfileobj", copy_while_another_rank_unpacks)
    out = archive_reader._ungzip_to_cache(archive)
    assert calls == [out]
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left behind
    monkeypatch.setattr(archive_reader.shutil, "copyfileobj", real_copy)
    spec = read_data(str(archive))
    _check_small_cifar(spec, cifar_members)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_archive_with_two_members_of_one_name_reads_both(tmp_path: Path, cifar_members: dict[str, bytes], kind: str) -> None:
    names = sorted(n for n in cifar_members if "/train/" in n)
    cat = [n for n in names if "/cat/" in n]
    dog = [n for n in names if "/dog/" in n]
    members = [("cat/0000.jpg", cifar_members[cat[0]]), ("cat/0000.jpg", cifar_members[cat[1]])]  # same name, other bytes
    members += [(f"dog/{Path(n).name}", cifar_members[n]) for n in dog]
    archive = tmp_path / f"dup.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf, pytest.warns(UserWarning, match="Duplicate name"):
            for name, data in members:
                zf.writestr(name, data)
    else:
        with tarfile.open(archive, "w") as tf:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    spec = read_data(str(archive))
    cats = [it.source for it in spec.splits["train"] if spec.class_names[it.target] == "cat"]
    assert [read_bytes(s) for s in cats] == [cifar_members[cat[0]], cifar_members[cat[1]]]
    assert len({source_name(it.source) for it in spec.splits["train"]}) == len(spec.splits["train"])  # told apart


def test_tar_truncated_inside_a_member_header_is_an_error(tmp_path: Path, cifar_members: dict[str, bytes]) -> None:
    full = tmp_path / "full.tar"
    with tarfile.open(full, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in list(cifar_members.items())[:14]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    assert sum(read_data(str(full)).counts().values()) == 14
    with tarfile.open(full) as tf:
        header_at = tf.getmembers()[10].offset
    for cut_at in (header_at + 100, header_at + 512 + 3):  # inside the 11th header; inside its data
        cut = tmp_path / f"cut{cut_at}.tar"
        cut.write_bytes(full.read_bytes()[:cut_at])
        with pytest.raises(ImageRecError, match=rf"cut{cut_at}\.tar: .*(truncated|unexpected end)"):
            read_data(str(cut))
    garbage = tmp_path / "garbage.tar"  # an unreadable header in the middle
    data = bytearray(full.read_bytes())
    data[header_at : header_at + 512] = b"\x17" * 512
    garbage.write_bytes(bytes(data))
    with pytest.raises(ImageRecError, match=r"garbage\.tar: .*unreadable member header.*re-download"):
        read_data(str(garbage))


def _cifar_dir(root: Path, labels: list[int], n_rows: int) -> Path:
    digits, _ = mini_digits(n_rows)
    rows = np.repeat(digits.reshape(n_rows, 1, 784), 3, axis=1)[:, :, :784]  # gray digit in R, G and B planes
    rows = np.pad(rows.reshape(n_rows, 3, 28, 28), ((0, 0), (0, 0), (2, 2), (2, 2))).reshape(n_rows, 3072)
    write_pickle(root / "data_batch_1", {b"labels": labels, b"data": rows})
    write_pickle(root / "test_batch", {b"labels": [0, 1], b"data": rows[:2]})
    write_pickle(root / "batches.meta", {b"label_names": [b"a", b"b", b"c"]})
    return root


@pytest.mark.parametrize(("labels", "rows", "message"), [
    ([0, 1, 2, 3, 0, 1], 6, r"data_batch_1: label 3 is out of range: labels must be 0\.\.2"),
    ([0, 1, -1, 2, 0, 1], 6, r"data_batch_1: label -1 is out of range"),
    ([0, 1, 2, 0, 1], 6, r"data_batch_1: 6 images but 5 labels"),
])
def test_cifar_batch_labels_are_checked(tmp_path: Path, labels: list[int], rows: int, message: str) -> None:
    _cifar_dir(tmp_path, labels, rows)
    with pytest.raises(ImageRecError, match=message):
        read_data(str(tmp_path))
    (tmp_path / "data_batch_1").unlink()
    _cifar_dir(tmp_path, [0, 1, 2, 0, 1, 2], 6)  # the same batches with good labels read
    assert read_data(str(tmp_path)).counts() == {"train": 6, "test": 2}


def test_idx_class_without_training_images_is_dropped_like_a_folder_class(tmp_path: Path) -> None:
    digits, labels = mini_digits(300)
    keep = labels != 9
    write_idx(tmp_path / "train-images-idx3-ubyte", digits[keep])
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels[keep])
    write_idx(tmp_path / "t10k-images-idx3-ubyte", digits[:40])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:40])
    spec = read_data(str(tmp_path))
    assert spec.class_names == [str(d) for d in range(9)]
    assert spec.counts() == {"train": int(keep.sum()), "test": int((labels[:40] != 9).sum())}
    assert [spec.class_names[it.target] for it in spec.splits["test"]] == [str(v) for v in labels[:40] if v != 9]
    assert spec.notes == [f"{tmp_path}: test has classes missing from train (dropped): 9"]


def test_manifest_class_without_training_images_is_dropped(tmp_path: Path, images: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\nimgs/0.png,a,train\nimgs/1.png,b,train\nimgs/2.png,a,test\nimgs/3.png,z,test\n")
    spec = read_data(str(manifest))
    assert spec.class_names == ["a", "b"] and spec.counts() == {"train": 2, "test": 1}
    assert spec.notes == [f"{manifest}: test has classes missing from train (dropped): z"]


def test_manifest_listing_a_file_twice_uses_the_first_row(tmp_path: Path, images: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nimgs/0.png,a\nimgs/1.png,b\nimgs/./0.png,b\n")
    spec = read_data(str(manifest))
    assert [(Path(it.source).name, spec.class_names[it.target]) for it in spec.splits["train"]] == [("0.png", "a"), ("1.png", "b")]
    assert len(spec.notes) == 1 and "row 3: lists the same file as row 1" in spec.notes[0]


def test_zip_with_backslash_names_or_only_an_inner_zip_says_why(tmp_path: Path, cifar_members: dict[str, bytes]) -> None:
    data = next(iter(cifar_members.values()))
    windows = tmp_path / "windows.zip"
    with zipfile.ZipFile(windows, "w") as zf:
        zf.writestr("cat\\0.jpg", data)
        zf.writestr("dog\\0.jpg", data)
    with pytest.raises(ImageRecError, match=r"windows\.zip: the member names use '\\' as the folder separator"):
        read_data(str(windows))
    outer = tmp_path / "outer.zip"
    with zipfile.ZipFile(outer, "w") as zf:
        zf.write(windows, "inner.zip")
    with pytest.raises(ImageRecError, match=r"outer\.zip: holds no images, only the archive\(s\) inner\.zip"):
        read_data(str(outer))


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_ppm_files_are_read_and_tga_files_are_left_out_with_a_note(tmp_path: Path, kind: str) -> None:
    """A listing reads every format decoding reads (PPM/PGM/PBM too) and never drops an image file
    without a word: a TGA, which nothing in imagerec reads, is named in a note (train and eval log it)."""
    src = tmp_path / "src"
    for cls in ("cat", "dog"):
        (src / cls).mkdir(parents=True)
        Image.new("RGB", (4, 4), (9, 9, 9)).save(src / cls / "a.png")
    Image.new("RGB", (4, 4), (200, 0, 0)).save(src / "cat" / "b.ppm")
    Image.new("L", (4, 4), 7).save(src / "dog" / "c.pgm")
    Image.new("RGB", (4, 4)).save(src / "cat" / "d.tga")
    (src / "cat" / "notes.txt").write_text("not an image")
    data = src
    if kind == "zip":
        data = tmp_path / "data.zip"
        with zipfile.ZipFile(data, "w") as zf:
            for p in sorted(src.rglob("*")):
                zf.write(p, p.relative_to(src).as_posix())
    spec = read_data(str(data))
    names = sorted(source_name(it.source).rsplit("/", 1)[-1] for it in spec.splits["train"])
    assert names == ["a.png", "a.png", "b.ppm", "c.pgm"]
    ppm = next(it.source for it in spec.splits["train"] if source_name(it.source).endswith("b.ppm"))
    assert np.asarray(open_image(ppm))[0, 0].tolist() == [200, 0, 0]
    (note,) = [n for n in spec.notes if ".tga" in n]
    assert note == (f"{data}: left out 1 image file(s) of formats imagerec does not read (1 .tga); it reads JPEG, PNG, "
                    "GIF, BMP, TIFF, WebP or PPM/PGM/PBM: convert them (e.g. to PNG) to use them")
