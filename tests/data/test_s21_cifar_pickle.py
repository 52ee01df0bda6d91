"""Session 21 (QA "sec" bug 6): a CIFAR batch pickle cannot make numpy reserve a size written in the
file (a 181-byte batch asked for 9 TiB and crashed every command with a MemoryError traceback), and
real batches, pickled as the originals are and by newer protocols, still load."""

from __future__ import annotations

import _codecs
import pickle
from pathlib import Path

import numpy as np
import pytest

from imagerec.cli import main
from imagerec.data import read_data
from imagerec.data.idx import load_cifar_batch
from imagerec.utils import ImageRecError

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

HUGE = 10**13  # 9 TiB of uint8, 80 TiB of objects


class _Call:
    """Pickles into `func(*args)`, then BUILD with `state` when given: a crafted batch entry."""

    def __init__(self, func: object, args: tuple, state: object = None) -> None:
        self.reduced = (func, args) if state is None else (func, args, state)

    def __reduce__(self) -> tuple:
        return self.reduced


CRAFTED = {
    "ndarray called": (_Call(np.ndarray, ((HUGE,), np.dtype("u1"))), "refusing to call numpy.ndarray"),
    "reconstruct of a size": (_Call(_reconstruct, (np.ndarray, (HUGE,), b"b")), r"refusing numpy _reconstruct of shape \(10000000000000,\)"),
    "object array of a size": (_Call(_reconstruct, (np.ndarray, (0,), b"b"), (1, (HUGE,), np.dtype("O"), False, [1])),
                               "refusing a numpy array that is not filled from bytes"),
    "bytes short of the shape": (_Call(_reconstruct, (np.ndarray, (0,), b"b"), (1, (HUGE,), np.dtype("u1"), False, b"abc")),
                                 "buffer size does not match array size"),
    "another codec": (_Call(_codecs.encode, ("x" * 10, "zlib_codec")), "refusing _codecs.encode with 'zlib_codec'"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_batch_is_one_error_naming_the_file(tmp_path: Path, case: str) -> None:
    entry, says = CRAFTED[case]
    batch = tmp_path / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": entry, b"labels": [0]}, protocol=2))
    assert batch.stat().st_size < 300
    with pytest.raises(ImageRecError, match=f"^{batch}: not a readable CIFAR batch \\(.*{says}"):
        load_cifar_batch(batch)


def test_the_cli_says_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "c_huge"
    root.mkdir()
    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": CRAFTED["ndarray called"][0], b"labels": [0]}, protocol=2))
    assert main(["check", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {root / 'data_batch_1'}: not a readable CIFAR batch (refusing to call numpy.ndarray")
    assert "Traceback" not in err and "MemoryError" not in err


def test_memory_error_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imagerec.data import idx

    def no_memory(self):  # type: ignore[no-untyped-def]
        raise MemoryError

    monkeypatch.setattr(idx._ArrayOnlyUnpickler, "load", no_memory)
    (tmp_path / "b").write_bytes(pickle.dumps({b"labels": [0]}, protocol=2))
    with pytest.raises(ImageRecError, match=r"b: not a readable CIFAR batch \(too large for memory\)"):
        load_cifar_batch(tmp_path / "b")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_real_batches_still_load(tmp_path: Path, protocol: int) -> None:
    rng = np.random.default_rng(protocol)
    rows = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    fortran = np.asfortranarray(rng.integers(0, 256, (2, 3072), dtype=np.uint8))  # pickled as its own layout
    for name, data, labels in (("data_batch_1", rows, [0, 1, 2]), ("test_batch", fortran, [2, 1])):
        (tmp_path / name).write_bytes(pickle.dumps(
            {b"batch_label": name.encode(), b"labels": labels, b"data": data,
             b"filenames": [f"{i}.png".encode() for i in range(len(labels))]}, protocol=protocol))
    (tmp_path / "batches.meta").write_bytes(pickle.dumps(
        {b"label_names": [b"a", b"b", b"c"], b"num_cases_per_batch": 3, b"num_vis": 3072}, protocol=protocol))
    batch = load_cifar_batch(tmp_path / "data_batch_1")
    assert type(batch["data"]) is np.ndarray and np.array_equal(batch["data"], rows)
    spec = read_data(str(tmp_path))
    assert spec.class_names == ["a", "b", "c"]
    assert [it.target for it in spec.splits["test"]] == [2, 1]
    expected = fortran.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert np.array_equal(spec.arrays["test"], expected)
    assert np.array_equal(spec.arrays["train"], rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
