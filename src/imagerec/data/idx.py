"""Binary array formats: MNIST-style IDX files and CIFAR-10/100 python batches.

CIFAR batches are pickles by definition; they are read with an unpickler that only builds
dicts, lists, strings, numbers and numpy arrays, so a hostile file cannot run code.
"""

from __future__ import annotations

import gzip
import math
import pickle
import re
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from imagerec.utils import ImageRecError

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (raw or gzip): magic (0, 0, dtype, ndim), big-endian dims, data."""
    p = Path(path)
    try:
        raw = gzip.open(p, "rb").read() if p.name.endswith(".gz") else p.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: damaged compressed data (a traceback before)
        raise ImageRecError(f"{p}: cannot read IDX file ({e}); the file is damaged or incomplete: download it again") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ImageRecError(f"{p}: not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    # Python ints: np.prod wraps around in int64, so a header of 65536 x 65536 x 65536 x 65536
    # came to 0 bytes and passed this check
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - offset != expected:
        raise ImageRecError(f"{p}: IDX header says {dims} but the file holds {len(raw) - offset} bytes of data, not {expected}")
    try:
        arr = np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims)
    except ValueError as e:  # a 0 among dims too large to index (0 x 2**32 x 2**32 x 2**32)
        raise ImageRecError(f"{p}: IDX header says {dims}, which no array can hold ({e}); the file is damaged") from e
    if arr.ndim == 3 and arr.dtype != np.uint8:
        raise ImageRecError(f"{p}: IDX images must be uint8, got {arr.dtype}")
    return arr.astype(arr.dtype.newbyteorder("=")) if arr.dtype.byteorder == ">" else arr


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzip-compressed, reproducibly, when the name ends in .gz)."""
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.tobytes()
    p = Path(path)
    p.write_bytes(gzip.compress(data, 9, mtime=0) if p.name.endswith(".gz") else data)


def _idx_split(name: str) -> str | None:
    n = name.lower()
    if re.search(r"(^|[-_.])(train)([-_.]|$)", n):
        return "train"
    if re.search(r"(^|[-_.])(t10k|test)([-_.]|$)", n):
        return "test"
    return None


def find_idx_pairs(root: Path) -> dict[str, tuple[Path, Path]]:
    """{split: (images file, labels file)} for the IDX files in `root`."""
    found: dict[str, dict[str, Path]] = {}
    for p in sorted(root.iterdir()):
        kind = "images" if "idx3" in p.name else "labels" if "idx1" in p.name else None
        split = _idx_split(p.name)
        if kind and split:
            found.setdefault(split, {})[kind] = p
    pairs = {s: (d["images"], d["labels"]) for s, d in found.items() if "images" in d and "labels" in d}
    if not pairs:
        raise ImageRecError(f"{root}: no matching *-images-idx3-ubyte / *-labels-idx1-ubyte pair found")
    return pairs


def is_idx_dir(root: Path) -> bool:
    return any("idx3" in p.name for p in root.iterdir())


class _NdarrayName:
    """Stands for `numpy.ndarray` in a CIFAR pickle. Real batches only pass it to `_reconstruct`;
    called itself (REDUCE), ndarray would reserve any shape the file names (terabytes) before
    anything is checked, so it cannot be called."""

    __slots__ = ()

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise pickle.UnpicklingError("refusing to call numpy.ndarray: arrays are only built from the file's bytes")


_NDARRAY = _NdarrayName()


class _FileArray(np.ndarray):
    """The array `_reconstruct` gives a CIFAR pickle, which BUILD then fills. Only from bytes in the
    file, whose size numpy checks against the shape before anything is reserved: object arrays
    (a list state) get their whole shape reserved first, whatever the list holds."""

    def __setstate__(self, state: object) -> None:
        raw = state[-1] if isinstance(state, tuple) and len(state) in (4, 5) else None
        if not isinstance(raw, bytes):
            raise pickle.UnpicklingError("refusing a numpy array that is not filled from bytes (an object array)")
        super().__setstate__(state)  # ValueError when the bytes do not match the shape and dtype


def _reconstruct_from_file(real: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """numpy's `_reconstruct(ndarray, (0,), b'b')`, the empty array every pickled array starts as;
    any other shape would be reserved from a number in the file."""

    def reconstruct(subtype: object, shape: object, dtype: object) -> np.ndarray:
        if subtype is not _NDARRAY or not isinstance(shape, tuple) or shape != (0,):
            raise pickle.UnpicklingError(f"refusing numpy _reconstruct of shape {str(shape)[:40]}: "
                                         "pickled arrays start empty, as (0,)")
        return real(_FileArray, shape, dtype)

    return reconstruct


def _latin1_encode(text: object, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """`_codecs.encode(str, 'latin1')`: how Python 3 pickles bytes in protocols 0-2; no other codec."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with {str(encoding)[:20]!r}: only latin1 makes bytes")
    return text.encode("latin1", errors)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays of the file's own bytes: what CIFAR
    batches hold. numpy's names are wrapped so that no size read from the file is ever allocated."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5: frombuffer(file bytes).reshape(shape)
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if name == "ndarray":
            return _NDARRAY
        if name == "encode":
            return _latin1_encode
        found = super().find_class(module, name)
        return _reconstruct_from_file(found) if name == "_reconstruct" else found


def _plain(value: object) -> object:
    return value.view(np.ndarray) if isinstance(value, _FileArray) else value


# what a damaged or crafted pickle raises, besides UnpicklingError; MemoryError for a size that is
# still too large for this machine (a file of many GB)
_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError, KeyError,
                  IndexError, OverflowError, RecursionError, MemoryError)


def load_cifar_batch(path: Path) -> dict:
    """The dict in a CIFAR python batch or meta file, read without running any code in it."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    except _PICKLE_ERRORS as e:
        why = "too large for memory" if isinstance(e, MemoryError) else str(e)[:200]
        raise ImageRecError(f"{path}: not a readable CIFAR batch ({why}); only dicts of arrays and lists are accepted") from e
    if not isinstance(obj, dict):
        raise ImageRecError(f"{path}: a CIFAR batch must be a dict, got {type(obj).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): _plain(v) for k, v in obj.items()}


def _names(meta_file: Path, meta: dict, key: str) -> list[str]:
    """The class names in a CIFAR meta file: a list of distinct strings under `key`.

    Duplicates are refused here, when the data is read: a run keys its per-class metrics by
    name, so two classes of one name trained to the end and then failed at the final evaluation.
    """
    raw = meta.get(key)
    if not isinstance(raw, (list, tuple)) or not all(isinstance(n, (bytes, str)) for n in raw):
        found = f"keys {sorted(map(str, meta))}" if raw is None else f"a {type(raw).__name__}"
        raise ImageRecError(
            f"{meta_file}: CIFAR meta must hold '{key}', a list of class names; found {found}. "
            "The file is damaged or not this dataset's: re-download it, or remove it to name classes by number"
        )
    names = [n.decode(errors="replace") if isinstance(n, bytes) else n for n in raw]
    repeated = sorted(n for n, c in Counter(names).items() if c > 1)
    if repeated:
        raise ImageRecError(
            f"{meta_file}: '{key}' names a class more than once ({', '.join(repr(n) for n in repeated[:5])}); "
            "class names must be distinct: fix or re-download the file"
        )
    return names


def _batch_data(path: Path, batch: dict) -> np.ndarray:
    """A batch's images as (N, 3072) uint8 rows, checked before anything is joined or cast."""
    try:
        data = np.asarray(batch["data"])
    except (TypeError, ValueError) as e:  # ragged lists
        raise ImageRecError(f"{path}: CIFAR data must be N x 3072 uint8 rows ({e}); the batch is damaged, re-download it") from e
    if data.ndim != 2 or data.shape[1] != 3072 or (data.size and data.dtype.kind not in "iu"):
        what = f"{data.dtype} values of shape {data.shape}" if data.dtype.kind in "iuf" else f"a {type(batch['data']).__name__} object"
        raise ImageRecError(f"{path}: CIFAR data must be N x 3072 uint8 rows (values 0-255), got {what}; the batch is damaged, re-download it")
    if data.dtype != np.uint8 and data.size and (data.min() < 0 or data.max() > 255):
        raise ImageRecError(
            f"{path}: CIFAR data must be uint8 values 0-255, found values from {int(data.min())} to {int(data.max())}; "
            "the batch is damaged, re-download it"
        )
    return data.astype(np.uint8, copy=False)


def is_cifar_dir(root: Path) -> bool:
    return (root / "data_batch_1").exists() or ((root / "train").is_file() and (root / "meta").is_file())


def read_cifar_dir(root: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    """CIFAR-10 (`data_batch_1..5`, `test_batch`, `batches.meta`) or CIFAR-100 (`train`, `test`, `meta`)."""
    if (root / "data_batch_1").exists():
        files = {"train": sorted(root.glob("data_batch_*")), "test": [root / "test_batch"]}
        meta_file, names_key, label_key = root / "batches.meta", "label_names", "labels"
    else:
        files = {"train": [root / "train"], "test": [root / "test"]}
        meta_file, names_key, label_key = root / "meta", "fine_label_names", "fine_labels"
    arrays, labels = {}, {}
    owners: list[tuple[Path, np.ndarray]] = []  # (batch file, its labels), for messages
    for split, paths in files.items():
        paths = [p for p in paths if p.exists()]
        if not paths:
            continue
        batches = [load_cifar_batch(p) for p in paths]
        for p, b in zip(paths, batches, strict=True):
            if "data" not in b or label_key not in b:
                raise ImageRecError(f"{p}: a CIFAR batch needs 'data' and '{label_key}' entries")
        data_rows = [_batch_data(p, b) for p, b in zip(paths, batches, strict=True)]
        data = np.concatenate(data_rows)
        batch_labels = [_batch_labels(p, b, label_key, len(d)) for p, b, d in zip(paths, batches, data_rows, strict=True)]
        arrays[split] = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N, H, W, C)
        labels[split] = np.concatenate(batch_labels)
        owners += [(p, lab) for p, lab in zip(paths, batch_labels, strict=True)]
    if "train" not in arrays:
        raise ImageRecError(f"{root}: no CIFAR training batches found")
    if meta_file.exists():
        class_names = _names(meta_file, load_cifar_batch(meta_file), names_key)
    else:
        class_names = [str(i) for i in range(max(int(v.max(initial=0)) for v in labels.values()) + 1)]
    for p, lab in owners:
        bad = lab[(lab < 0) | (lab >= len(class_names))]
        if len(bad):
            where = f"the {len(class_names)} names in {meta_file.name}" if meta_file.exists() else "labels from 0"
            raise ImageRecError(
                f"{p}: label {int(bad[0])} is out of range: labels must be 0..{len(class_names) - 1} "
                f"(one per class, {where}); {len(bad)} label(s) of this batch are outside it"
            )
    return arrays, labels, class_names


def _batch_labels(path: Path, batch: dict, label_key: str, rows: int) -> np.ndarray:
    """The batch's labels as int64, checked to be one integer per data row."""
    try:
        lab = np.asarray(batch[label_key])
    except (TypeError, ValueError) as e:
        raise ImageRecError(f"{path}: '{label_key}' must be a list of integers ({e})") from e
    if lab.ndim != 1 or (len(lab) and lab.dtype.kind not in "iu"):
        raise ImageRecError(f"{path}: '{label_key}' must be a flat list of integers, got {lab.dtype} of shape {lab.shape}")
    if rows != len(lab):
        raise ImageRecError(f"{path}: {rows} images but {len(lab)} labels; the batch is damaged, re-download it")
    return lab.astype(np.int64)
