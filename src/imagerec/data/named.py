"""Named datasets (`mnist`, `fashion-mnist`, `cifar10`, `mnist-mini`) resolved to local files.

A name resolves to a directory of the dataset's *original* distribution files, every one
checked against its published md5. Where to look, in order:

1. the `data_dir` argument,
2. `$IMAGEREC_DATA`,
3. the cache: `$IMAGEREC_CACHE`, else `$XDG_CACHE_HOME/imagerec`, else `~/.cache/imagerec`,
   plus `/datasets`.

In each of these roots the files may sit in `<root>/<name>/` (preferred) or in `<root>/`.
When nothing is found the files are downloaded into `<cache>/datasets/<name>/` (unless
`download=False` or `$IMAGEREC_OFFLINE=1`); `$IMAGEREC_MIRROR` replaces the mirror list
with one base URL. Offline, the error says exactly which files to fetch and where to put
them. `mnist-mini` is a small stratified MNIST subset shipped inside the package.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from imagerec.utils import ImageRecError, atomic_write, did_you_mean, md5_file

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"

_CHUNK = 1 << 16
_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class DatasetFile:
    """One file of a dataset with its published md5 (and byte size where known)."""

    name: str
    md5: str
    size: int | None = None


@dataclass(frozen=True)
class NamedDataset:
    """What a dataset name stands for: its files, where to fetch them, what they unpack to.

    `files` are what is downloaded and verified. For an archive (`extract_dir` set) the
    resolved path is `<dir>/<extract_dir>`, and `contents` lists the files inside it that
    are verified after extraction.
    """

    name: str
    description: str
    files: tuple[DatasetFile, ...]
    mirrors: tuple[str, ...] = ()
    extract_dir: str | None = None
    contents: tuple[DatasetFile, ...] = ()
    embedded: bool = False
    license: str = ""


_MNIST_FILES = (
    DatasetFile("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", 9912422),
    DatasetFile("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", 28881),
    DatasetFile("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", 1648877),
    DatasetFile("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", 4542),
)

NAMED_DATASETS: dict[str, NamedDataset] = {
    "mnist": NamedDataset(
        name="mnist",
        description="MNIST handwritten digits: 60000 train / 10000 test, 28x28 grayscale, 10 classes (IDX .gz).",
        files=_MNIST_FILES,
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        license="CC BY-SA 3.0 (Y. LeCun, C. Cortes, C. J. C. Burges)",
    ),
    "fashion-mnist": NamedDataset(
        name="fashion-mnist",
        description="Fashion-MNIST (Zalando): 60000 train / 10000 test, 28x28 grayscale, 10 classes (IDX .gz).",
        files=(
            DatasetFile("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", 26421880),
            DatasetFile("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", 29515),
            DatasetFile("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", 4422102),
            DatasetFile("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", 5148),
        ),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        license="MIT (Zalando SE)",
    ),
    "cifar10": NamedDataset(
        name="cifar10",
        description="CIFAR-10: 50000 train / 10000 test, 32x32 RGB, 10 classes (pickled Python batches).",
        files=(DatasetFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", 170498071),),
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        extract_dir="cifar-10-batches-py",
        contents=(
            DatasetFile("data_batch_1", "c99cafc152244af753f735de768cd75f"),
            DatasetFile("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
            DatasetFile("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
            DatasetFile("data_batch_4", "634d18415352ddfa80567beed471001a"),
            DatasetFile("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
            DatasetFile("test_batch", "40351d587109b95175f43aff81a1287e"),
            DatasetFile("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
        ),
        license="A. Krizhevsky, 'Learning Multiple Layers of Features from Tiny Images', 2009",
    ),
    # Written by scripts/make_embedded_mnist.py (gzip mtime=0, so byte-reproducible).
    "mnist-mini": NamedDataset(
        name="mnist-mini",
        description="Stratified MNIST subset shipped with imagerec: 6000 train / 1000 test (600/100 per class).",
        files=(
            DatasetFile("train-images-idx3-ubyte.gz", "4b1ba78e88122ef96897c1780d5c2568", 968527),
            DatasetFile("train-labels-idx1-ubyte.gz", "00b7fc418c1e06cd5a664d6d234c2201", 3069),
            DatasetFile("t10k-images-idx3-ubyte.gz", "6319afe34a8fd27b4a16ce806f35c547", 159610),
            DatasetFile("t10k-labels-idx1-ubyte.gz", "32a3da652312893155aef60b34ac07f8", 524),
        ),
        embedded=True,
        license="CC BY-SA 3.0 (Y. LeCun, C. Cortes, C. J. C. Burges)",
    ),
}


def list_named_datasets() -> list[str]:
    """Names accepted by `resolve_named_dataset`, sorted."""
    return sorted(NAMED_DATASETS)


def is_named_dataset(name: str) -> bool:
    """True when `name` (case-insensitive, `_` or `-`) is a known dataset name."""
    return _normalize(name) in NAMED_DATASETS


def resolve_named_dataset(name: str, data_dir: str | Path | None = None, download: bool = True) -> Path:
    """Return the local directory holding the verified original files of dataset `name`.

    Looks in `data_dir`, then `$IMAGEREC_DATA`, then `<cache>/datasets`, each as `<root>/<name>/`
    or `<root>/` itself; every file's md5 is checked. If the files are not there and
    `download` is true and `$IMAGEREC_OFFLINE` is not "1", they are downloaded into
    `<cache>/datasets/<name>/` (archives are extracted). For `mnist` and `fashion-mnist`
    the result holds the four IDX .gz files; for `cifar10` it is the `cifar-10-batches-py`
    folder; `mnist-mini` is always the copy embedded in the package.

    Example:
        >>> root = resolve_named_dataset("mnist-mini")
        >>> sorted(p.name for p in root.glob("*.gz"))[0]
        't10k-images-idx3-ubyte.gz'
    """
    key = _normalize(name)
    if key not in NAMED_DATASETS:
        raise ImageRecError(
            f"unknown dataset name '{name}'.{did_you_mean(key, NAMED_DATASETS)} "
            f"Known names: {', '.join(list_named_datasets())}."
        )
    spec = NAMED_DATASETS[key]
    if spec.embedded:
        return _resolve_embedded(spec)

    for root in _search_roots(data_dir):
        for candidate in (root / spec.name, root):
            if candidate == root and _holds_another_dataset(spec, root):
                continue  # e.g. MNIST's files loose in $IMAGEREC_DATA while fashion-mnist is asked for
            found = _find_in(spec, candidate)
            if found is not None:
                return found

    target = _cache_root() / "datasets" / spec.name
    if not download:
        raise ImageRecError(_missing_message(spec, data_dir, "downloading is switched off (download=False)"))
    if os.environ.get("IMAGEREC_OFFLINE") == "1":
        raise ImageRecError(_missing_message(spec, data_dir, "IMAGEREC_OFFLINE=1 forbids downloading"))
    _download_all(spec, target, data_dir)
    found = _find_in(spec, target)
    if found is None:  # only if the files vanished between download and check
        raise ImageRecError(_missing_message(spec, data_dir, f"the files downloaded to {target} are incomplete"))
    return found


# ---------------------------------------------------------------------------------------
# Looking for local files


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _cache_root() -> Path:
    if os.environ.get("IMAGEREC_CACHE"):
        return Path(os.environ["IMAGEREC_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "imagerec"
    return Path.home() / ".cache" / "imagerec"


def _search_roots(data_dir: str | Path | None) -> list[Path]:
    roots = []
    if data_dir is not None:
        roots.append(Path(data_dir).expanduser())
    if os.environ.get("IMAGEREC_DATA"):
        roots.append(Path(os.environ["IMAGEREC_DATA"]).expanduser())
    roots.append(_cache_root() / "datasets")
    return roots


def _verify(path: Path, expected: DatasetFile, spec: NamedDataset, fix: str) -> None:
    """Raise ImageRecError when `path` does not have the expected md5."""
    actual = md5_file(path)
    if actual == expected.md5:
        return
    size = path.stat().st_size
    size_note = ""
    if expected.size is not None and size != expected.size:
        size_note = f" It has {size} bytes instead of {expected.size} (truncated or a different file?)."
    raise ImageRecError(
        f"{path} is not the {spec.name} file {expected.name}: md5 is {actual}, expected {expected.md5}."
        f"{size_note} {fix}"
    )


def _fix_hint(spec: NamedDataset, path: Path) -> str:
    if spec.embedded:
        return "The copy shipped with imagerec is damaged: reinstall imagerec."
    return f"Delete {path} (it is downloaded again when allowed) or replace it with the original file."


def _find_in(spec: NamedDataset, folder: Path) -> Path | None:
    """The dataset path inside `folder` when it holds the complete dataset, else None.

    A file that is present but has a wrong md5 is an error, never silently skipped.
    """
    if not folder.is_dir():
        return None
    if spec.extract_dir is None:
        return folder if _complete(spec, spec.files, folder) else None

    # An archive dataset: the extracted folder inside `folder`, `folder` being the extracted
    # folder itself, or the archive next to it (extracted now).
    for extracted in (folder / spec.extract_dir, folder):
        if extracted.is_dir() and _complete(spec, spec.contents, extracted):
            return extracted
    if _complete(spec, spec.files, folder):
        dest = folder if os.access(folder, os.W_OK) else _cache_root() / "datasets" / spec.name
        _extract(spec, folder / spec.files[0].name, dest)
        return dest / spec.extract_dir
    return None


def _complete(spec: NamedDataset, files: tuple[DatasetFile, ...], folder: Path) -> bool:
    """True when every file is in `folder` with the right md5; a wrong md5 raises."""
    present = [f for f in files if (folder / f.name).is_file()]
    for f in present:
        _verify(folder / f.name, f, spec, _fix_hint(spec, folder / f.name))
    return len(present) == len(files)


def _holds_another_dataset(spec: NamedDataset, folder: Path) -> bool:
    """`folder` holds a file named like one of `spec`'s that is another dataset's (same md5).

    MNIST and Fashion-MNIST name their files alike, and a search root may hold either loose: there
    it is the other dataset's file, not a damaged one of `spec` (which was an error telling the
    user to delete their good MNIST file, before the cache, where `spec` was, got looked at).
    """
    others = {(f.name, f.md5) for d in NAMED_DATASETS.values() if d.name != spec.name for f in (*d.files, *d.contents)}
    shared = {f.name for f in (*spec.files, *spec.contents)} & {name for name, _ in others}
    return any((folder / name).is_file() and (name, md5_file(folder / name)) in others for name in sorted(shared))


def _resolve_embedded(spec: NamedDataset) -> Path:
    folder = EMBEDDED_DIR / spec.name
    missing = [f.name for f in spec.files if not (folder / f.name).is_file()]
    if missing:
        raise ImageRecError(
            f"the embedded dataset {spec.name} is missing {', '.join(missing)} in {folder}: "
            "reinstall imagerec, or regenerate it with scripts/make_embedded_mnist.py"
        )
    _complete(spec, spec.files, folder)
    return folder


# ---------------------------------------------------------------------------------------
# Downloading


def _mirrors() -> tuple[str, ...] | None:
    override = os.environ.get("IMAGEREC_MIRROR", "").strip()
    return (override,) if override else None


def _urls(spec: NamedDataset, file: DatasetFile) -> list[str]:
    bases = _mirrors() or spec.mirrors
    return [base.rstrip("/") + "/" + file.name for base in bases]


def _download_all(spec: NamedDataset, target: Path, data_dir: str | Path | None) -> None:
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ImageRecError(
            f"cannot create the dataset cache folder {target} ({e}): set IMAGEREC_CACHE to a writable folder"
        ) from e
    todo = [f for f in spec.files if not (target / f.name).is_file()]
    console = Console(stderr=True)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        for file in todo:
            errors = []
            for url in _urls(spec, file):
                task = progress.add_task(file.name, total=file.size)
                try:
                    _download_one(url, file, target / file.name, progress, task)
                    break
                except _DownloadFailed as e:
                    errors.append(f"{url}: {e}")
                    progress.update(task, description=f"{file.name} [red](failed)")
            else:
                raise ImageRecError(
                    _missing_message(spec, data_dir, "every download failed:\n  " + "\n  ".join(errors))
                )


class _DownloadFailed(Exception):
    pass


def _download_one(url: str, file: DatasetFile, dest: Path, progress: Progress, task: int) -> None:
    """Fetch `url` into a temp file beside `dest`, check its md5, then rename it to `dest`."""
    try:
        md5 = hashlib.md5()
        with atomic_write(dest, "wb") as out, urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit():
                progress.update(task, total=int(length))
            while block := resp.read(_CHUNK):
                out.write(block)
                md5.update(block)
                progress.advance(task, len(block))
            if md5.hexdigest() != file.md5:  # inside the block: a bad file never reaches `dest`
                raise _DownloadFailed(f"md5 is {md5.hexdigest()}, expected {file.md5} (corrupt or wrong file)")
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise _DownloadFailed(str(e)) from e


def _extract(spec: NamedDataset, archive: Path, dest: Path) -> None:
    """Safely unpack `archive` and move the missing `contents` into `dest/<extract_dir>`."""
    assert spec.extract_dir is not None
    if not hasattr(tarfile, "data_filter"):  # Python < 3.10.12 / 3.11.4
        raise ImageRecError(f"extracting {archive} safely needs Python >= 3.11.4 (or 3.10.12): upgrade Python")
    final = dest / spec.extract_dir
    final.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=dest) as tmp:
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")  # refuses absolute paths, '..', devices
        except (tarfile.TarError, OSError) as e:
            raise ImageRecError(f"cannot extract {archive} ({e}): delete it and run again") from e
        for f in spec.contents:
            src = Path(tmp) / spec.extract_dir / f.name
            if not src.is_file():
                raise ImageRecError(f"{archive} has no {spec.extract_dir}/{f.name}: delete it and run again")
            if not (final / f.name).is_file():
                shutil.move(src, final / f.name)
    _complete(spec, spec.contents, final)


# ---------------------------------------------------------------------------------------
# The error that says what to do by hand


def _missing_message(spec: NamedDataset, data_dir: str | Path | None, why: str) -> str:
    places = []
    if data_dir is not None:
        places.append(Path(data_dir).expanduser() / spec.name)
    if os.environ.get("IMAGEREC_DATA"):
        places.append(Path(os.environ["IMAGEREC_DATA"]).expanduser() / spec.name)
    places.append(_cache_root() / "datasets" / spec.name)
    places = list(dict.fromkeys(places))  # --data-dir reaches here as $IMAGEREC_DATA too
    where = f"{places[0]}/"
    if len(places) > 1:
        where += " (or " + " or ".join(f"{p}/" for p in places[1:]) + ")"
    lines = [f"dataset '{spec.name}' was not found locally, and {why}."]
    given = [Path(p).expanduser() for p in (data_dir, os.environ.get("IMAGEREC_DATA")) if p]
    lines += [f"Note: the data folder {p}/ does not exist (a typo in --data-dir or $IMAGEREC_DATA?)."
              for p in dict.fromkeys(given) if not p.is_dir()]
    lines.append(f"Put these files in {where}:")
    for f in spec.files:
        size = f"{f.size} bytes, " if f.size is not None else ""
        lines.append(f"  {f.name}  ({size}md5 {f.md5})")
    if spec.extract_dir:
        lines.append(f"or the folder {spec.extract_dir}/ extracted from it.")
    lines.append("On a machine with internet, fetch them from:")
    for f in spec.files:
        lines.extend(f"  {url}" for url in _urls(spec, f))
    lines.append(
        f"Or point imagerec at a folder that holds {spec.name}/ with them: --data-dir DIR on the command line, "
        "$IMAGEREC_DATA, or data_dir= in Python."
    )
    return "\n".join(lines)
