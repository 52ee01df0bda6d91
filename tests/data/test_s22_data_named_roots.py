"""A search root holding another dataset's files loose (MNIST and Fashion-MNIST share file names)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from imagerec.data import named
from imagerec.data.named import DatasetFile, NamedDataset, resolve_named_dataset
from imagerec.utils import ImageRecError

MNIST = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "mnist"


def _dataset(name: str, content: bytes) -> NamedDataset:
    return NamedDataset(name=name, description=name, files=(DatasetFile("images.gz", hashlib.md5(content).hexdigest()),))


def test_another_datasets_loose_files_do_not_hide_this_one_in_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(named.NAMED_DATASETS, "qa-digits", _dataset("qa-digits", b"digits"))
    monkeypatch.setitem(named.NAMED_DATASETS, "qa-fashion", _dataset("qa-fashion", b"fashion"))
    monkeypatch.setenv("IMAGEREC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("IMAGEREC_OFFLINE", "1")
    monkeypatch.delenv("IMAGEREC_DATA", raising=False)
    loose = tmp_path / "data"
    loose.mkdir()
    (loose / "images.gz").write_bytes(b"digits")  # qa-digits' file, loose in the data folder
    cached = tmp_path / "cache" / "datasets" / "qa-fashion"
    cached.mkdir(parents=True)
    (cached / "images.gz").write_bytes(b"fashion")
    assert resolve_named_dataset("qa-fashion", data_dir=loose) == cached
    assert resolve_named_dataset("qa-digits", data_dir=loose) == loose
    (loose / "images.gz").write_bytes(b"damaged")  # a file of no dataset is still refused
    with pytest.raises(ImageRecError, match=r"images.gz is not the qa-fashion file images.gz"):
        resolve_named_dataset("qa-fashion", data_dir=loose)


@pytest.mark.skipif(not MNIST.is_dir(), reason="needs ../shared/datasets/mnist")
def test_fashion_mnist_offline_beside_loose_mnist_says_where_to_put_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGEREC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("IMAGEREC_OFFLINE", "1")
    monkeypatch.delenv("IMAGEREC_DATA", raising=False)
    with pytest.raises(ImageRecError) as info:
        resolve_named_dataset("fashion-mnist", data_dir=MNIST)
    # not "... is not the fashion-mnist file ...: Delete <the user's good MNIST file>"
    assert str(info.value).startswith("dataset 'fashion-mnist' was not found locally, and IMAGEREC_OFFLINE=1")
    assert resolve_named_dataset("mnist", data_dir=MNIST) == MNIST
