"""Named datasets: local lookup, md5 checks, downloads from a real local HTTP server, offline errors."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import io
import shutil
import tarfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from imagerec.data.named import (
    NAMED_DATASETS,
    DatasetFile,
    is_named_dataset,
    list_named_datasets,
    resolve_named_dataset,
)
from imagerec.utils import ImageRecError, md5_file

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
MNIST_DIR = SHARED / "mnist"
MNIST_MD5 = {f.name: f.md5 for f in NAMED_DATASETS["mnist"].files}

needs_mnist = pytest.mark.skipif(
    not all((MNIST_DIR / name).is_file() for name in MNIST_MD5), reason=f"MNIST files not in {MNIST_DIR}"
)


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No outside data, mirror or cache leaks in; the cache is a fresh temp folder."""
    for var in ("IMAGEREC_DATA", "IMAGEREC_MIRROR", "IMAGEREC_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("IMAGEREC_CACHE", str(cache))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return cache


def link_mnist(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in MNIST_MD5:
        (folder / name).symlink_to(MNIST_DIR / name)
    return folder


def copy_mnist(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in MNIST_MD5:
        shutil.copyfile(MNIST_DIR / name, folder / name)
    return folder


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def read_idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class Server:
    """A real HTTP server on 127.0.0.1 serving one folder, counting the requests it gets."""

    def __init__(self, root: Path) -> None:
        self.requests: list[str] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass  # keep test output quiet

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def serve() -> Iterator:
    servers: list[Server] = []

    def start(root: Path) -> Server:
        servers.append(Server(root))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


# --- names ---------------------------------------------------------------------------


def test_list_and_is_named_dataset() -> None:
    assert list_named_datasets() == ["cifar10", "fashion-mnist", "mnist", "mnist-mini"]
    assert is_named_dataset("mnist") and is_named_dataset("Fashion_MNIST")
    assert not is_named_dataset("imagenet") and not is_named_dataset("./mnist")


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(ImageRecError, match="Did you mean 'mnist'"):
        resolve_named_dataset("mnsit")


def test_table_has_md5_for_every_file() -> None:
    for spec in NAMED_DATASETS.values():
        for f in spec.files + spec.contents:
            assert len(f.md5) == 32 and int(f.md5, 16) >= 0, (spec.name, f.name)
        assert spec.embedded or spec.mirrors, spec.name
    assert NAMED_DATASETS["cifar10"].files[0].md5 == "c58f30108f718f92721af3b95e74349a"


# --- local files -------------------------------------------------------------------------


@needs_mnist
def test_resolve_mnist_via_imagerec_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    link_mnist(root / "mnist")
    monkeypatch.setenv("IMAGEREC_DATA", str(root))
    monkeypatch.setenv("IMAGEREC_OFFLINE", "1")
    path = resolve_named_dataset("mnist")
    assert path == root / "mnist"
    assert {p.name: md5_file(p) for p in path.iterdir()} == MNIST_MD5


@needs_mnist
@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_resolve_mnist_via_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    root = tmp_path / "data"
    folder = link_mnist(root / "mnist" if layout == "nested" else root)
    monkeypatch.setenv("IMAGEREC_OFFLINE", "1")
    assert resolve_named_dataset("mnist", data_dir=str(root)) == folder


@needs_mnist
def test_data_dir_comes_before_imagerec_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = link_mnist(tmp_path / "first" / "mnist")
    link_mnist(tmp_path / "second" / "mnist")
    monkeypatch.setenv("IMAGEREC_DATA", str(tmp_path / "second"))
    assert resolve_named_dataset("mnist", data_dir=tmp_path / "first") == first


@needs_mnist
def test_nested_layout_preferred_over_flat(tmp_path: Path) -> None:
    link_mnist(tmp_path)
    nested = link_mnist(tmp_path / "mnist")
    assert resolve_named_dataset("mnist", data_dir=tmp_path, download=False) == nested


@needs_mnist
def test_md5_mismatch_names_the_file(tmp_path: Path) -> None:
    folder = copy_mnist(tmp_path / "mnist")
    bad = folder / "t10k-labels-idx1-ubyte.gz"
    corrupt(bad)
    with pytest.raises(ImageRecError) as info:
        resolve_named_dataset("mnist", data_dir=tmp_path, download=False)
    msg = str(info.value)
    assert str(bad) in msg
    assert MNIST_MD5[bad.name] in msg and md5_file(bad) in msg
    assert "Delete" in msg


@needs_mnist
def test_partial_folder_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = link_mnist(tmp_path / "mnist")
    (folder / "train-images-idx3-ubyte.gz").unlink()
    monkeypatch.setenv("IMAGEREC_OFFLINE", "1")
    with pytest.raises(ImageRecError) as info:
        resolve_named_dataset("mnist", data_dir=tmp_path)
    assert "train-images-idx3-ubyte.gz" in str(info.value)


# --- downloads ------------------------------------------------------------------------------


@needs_mnist
def test_download_from_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: Path, serve) -> None:
    server = serve(copy_mnist(tmp_path / "www"))
    monkeypatch.setenv("IMAGEREC_MIRROR", server.url)
    path = resolve_named_dataset("mnist")
    assert path == clean_env / "datasets" / "mnist"
    assert {p.name: md5_file(p) for p in path.iterdir()} == MNIST_MD5  # no temp files left either
    assert sorted(server.requests) == sorted(f"/{name}" for name in MNIST_MD5)

    # Second time: found in the cache, nothing fetched.
    assert resolve_named_dataset("mnist") == path
    assert len(server.requests) == len(MNIST_MD5)


@needs_mnist
def test_download_only_fetches_missing_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: Path, serve
) -> None:
    cached = clean_env / "datasets" / "mnist"
    link_mnist(cached)
    (cached / "t10k-images-idx3-ubyte.gz").unlink()
    server = serve(copy_mnist(tmp_path / "www"))
    monkeypatch.setenv("IMAGEREC_MIRROR", server.url.rstrip("/"))  # no trailing slash works too
    assert resolve_named_dataset("mnist") == cached
    assert server.requests == ["/t10k-images-idx3-ubyte.gz"]


@needs_mnist
def test_corrupt_download_is_deleted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: Path, serve) -> None:
    www = copy_mnist(tmp_path / "www")
    corrupt(www / "train-labels-idx1-ubyte.gz")
    monkeypatch.setenv("IMAGEREC_MIRROR", serve(www).url)
    with pytest.raises(ImageRecError) as info:
        resolve_named_dataset("mnist")
    msg = str(info.value)
    assert "train-labels-idx1-ubyte.gz" in msg and MNIST_MD5["train-labels-idx1-ubyte.gz"] in msg
    cached = clean_env / "datasets" / "mnist"
    assert not (cached / "train-labels-idx1-ubyte.gz").exists()
    assert not list(cached.glob("*.part")) and not list(cached.glob(".*"))
    # The good file fetched before it is kept (and verified).
    assert md5_file(cached / "train-images-idx3-ubyte.gz") == MNIST_MD5["train-images-idx3-ubyte.gz"]


@needs_mnist
def test_mirrors_tried_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: Path, serve) -> None:
    (tmp_path / "empty").mkdir()
    empty = serve(tmp_path / "empty")
    good = serve(copy_mnist(tmp_path / "www"))
    spec = dataclasses.replace(NAMED_DATASETS["mnist"], mirrors=(empty.url, good.url))
    monkeypatch.setitem(NAMED_DATASETS, "mnist", spec)
    path = resolve_named_dataset("mnist")
    assert {p.name: md5_file(p) for p in path.iterdir()} == MNIST_MD5
    assert len(empty.requests) == 4 and len(good.requests) == 4  # each file: a 404, then a hit


def test_offline_error_says_what_to_do(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEREC_OFFLINE", "1")
    with pytest.raises(ImageRecError) as info:
        resolve_named_dataset("mnist")
    msg = str(info.value)
    assert "IMAGEREC_OFFLINE" in msg
    assert str(clean_env / "datasets" / "mnist") in msg
    for name, md5 in MNIST_MD5.items():
        assert name in msg and md5 in msg
        assert f"https://ossci-datasets.s3.amazonaws.com/mnist/{name}" in msg
    assert not (clean_env / "datasets" / "mnist").exists()  # nothing was attempted


def test_download_false_lists_data_dir(tmp_path: Path) -> None:
    with pytest.raises(ImageRecError) as info:
        resolve_named_dataset("fashion-mnist", data_dir=tmp_path / "mine", download=False)
    msg = str(info.value)
    assert "download=False" in msg and str(tmp_path / "mine" / "fashion-mnist") in msg
    assert "8d4fb7e6c68d591d4c3dfef9ec88bf0d" in msg
    assert f"the data folder {tmp_path / 'mine'}/ does not exist" in msg  # a typo is named as one
    (tmp_path / "mine").mkdir()
    with pytest.raises(ImageRecError) as info:
        resolve_named_dataset("fashion-mnist", data_dir=tmp_path / "mine", download=False)
    assert "does not exist" not in str(info.value)


# --- cifar10: archive + extraction (a tiny stand-in archive, same layout) ----------------


def make_cifar_like(folder: Path, evil: bool = False) -> tuple[Path, dict[str, bytes]]:
    """A small tar.gz shaped like cifar-10-python.tar.gz; returns it and its member contents."""
    contents = {name: f"{name} payload".encode() * 50 for name in ("data_batch_1", "test_batch", "batches.meta")}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in contents.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if evil:
            info = tarfile.TarInfo("../escaped.txt")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / "cifar-10-python.tar.gz"
    archive.write_bytes(buf.getvalue())
    return archive, contents


def patch_cifar(monkeypatch: pytest.MonkeyPatch, archive: Path, contents: dict[str, bytes]) -> None:
    md5 = {name: hashlib.md5(data).hexdigest() for name, data in contents.items()}
    spec = dataclasses.replace(
        NAMED_DATASETS["cifar10"],
        files=(DatasetFile(archive.name, md5_file(archive), archive.stat().st_size),),
        contents=tuple(DatasetFile(name, h) for name, h in md5.items()),
    )
    monkeypatch.setitem(NAMED_DATASETS, "cifar10", spec)


def test_cifar_download_and_extract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: Path, serve) -> None:
    archive, contents = make_cifar_like(tmp_path / "www")
    patch_cifar(monkeypatch, archive, contents)
    monkeypatch.setenv("IMAGEREC_MIRROR", serve(tmp_path / "www").url)
    path = resolve_named_dataset("cifar10")
    assert path == clean_env / "datasets" / "cifar10" / "cifar-10-batches-py"
    assert {p.name: p.read_bytes() for p in path.iterdir()} == contents
    assert not list(path.parent.glob(".extract-*"))


def test_cifar_local_archive_is_extracted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive, contents = make_cifar_like(tmp_path / "data" / "cifar10")
    patch_cifar(monkeypatch, archive, contents)
    path = resolve_named_dataset("cifar10", data_dir=tmp_path / "data", download=False)
    assert path == tmp_path / "data" / "cifar10" / "cifar-10-batches-py"
    assert sorted(p.name for p in path.iterdir()) == sorted(contents)
    # The extracted folder is accepted on its own too.
    archive.unlink()
    assert resolve_named_dataset("cifar10", data_dir=path, download=False) == path


def test_cifar_unsafe_archive_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive, contents = make_cifar_like(tmp_path / "data" / "cifar10", evil=True)
    patch_cifar(monkeypatch, archive, contents)
    with pytest.raises(ImageRecError, match="cannot extract"):
        resolve_named_dataset("cifar10", data_dir=tmp_path / "data", download=False)
    assert not (tmp_path / "data" / "escaped.txt").exists()
    assert not any(tmp_path.rglob("escaped.txt"))


# --- mnist-mini --------------------------------------------------------------------------


def test_mnist_mini_always_resolves(monkeypatch: pytest.MonkeyPatch, clean_env: Path) -> None:
    monkeypatch.setenv("IMAGEREC_OFFLINE", "1")
    path = resolve_named_dataset("mnist-mini")
    assert (path / "README.md").is_file() and "CC BY-SA 3.0" in (path / "README.md").read_text()
    assert not clean_env.exists()  # never downloaded or cached

    train_x, train_y = read_idx(path / "train-images-idx3-ubyte.gz"), read_idx(path / "train-labels-idx1-ubyte.gz")
    test_x, test_y = read_idx(path / "t10k-images-idx3-ubyte.gz"), read_idx(path / "t10k-labels-idx1-ubyte.gz")
    assert train_x.shape == (6000, 28, 28) and train_y.shape == (6000,)
    assert test_x.shape == (1000, 28, 28) and test_y.shape == (1000,)
    assert np.bincount(train_y, minlength=10).tolist() == [600] * 10
    assert np.bincount(test_y, minlength=10).tolist() == [100] * 10
    assert train_x.max() == 255 and 0.05 < (train_x > 0).mean() < 0.4  # real digit strokes, not blank


@needs_mnist
def test_mnist_mini_is_a_subset_of_mnist() -> None:
    mini = resolve_named_dataset("mnist-mini")
    for split in ("train", "t10k"):
        full_x = read_idx(MNIST_DIR / f"{split}-images-idx3-ubyte.gz")
        full_y = read_idx(MNIST_DIR / f"{split}-labels-idx1-ubyte.gz")
        label_of = {full_x[i].tobytes(): int(full_y[i]) for i in range(len(full_y))}
        mini_x = read_idx(mini / f"{split}-images-idx3-ubyte.gz")
        mini_y = read_idx(mini / f"{split}-labels-idx1-ubyte.gz")
        assert [label_of.get(x.tobytes()) for x in mini_x] == mini_y.tolist()
        assert len({x.tobytes() for x in mini_x}) == len(mini_x)  # no image twice
