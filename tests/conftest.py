"""Fixtures shared by the whole suite."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import imagerec

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
PG_ADMIN_URL = os.environ.get("IMAGEREC_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The real datasets beside the project (`../shared/datasets`); skips the test if absent."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATASETS}")
    return SHARED_DATASETS


@pytest.fixture(scope="session", autouse=True)
def imagerec_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One temp cache and home per test session, so unpacked archives never land in ~/.cache and
    the runs the CLI records go to a throwaway store, not ~/.local/share/imagerec."""
    cache = tmp_path_factory.mktemp("imagerec-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMAGEREC_CACHE", str(cache))
        mp.setenv("IMAGEREC_HOME", str(tmp_path_factory.mktemp("imagerec-home")))
        mp.delenv("IMAGEREC_DB", raising=False)
        yield cache


@pytest.fixture(scope="session")
def cnn_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `cnn` trained for 3 epochs on 1,000 mnist-mini digits (~93% val accuracy, ~12 s on 2 cores), shared by
    the export and robustness tests.

    A barely trained model has many near-tied classes that int8 rounding flips; this one is
    trained enough that the int8 gate measures quantization, not coin tosses."""
    out = tmp_path_factory.mktemp("export-run") / "cnn"
    result = imagerec.train(data="mnist-mini", out=str(out), model="cnn", epochs=3, limit_train=1000, batch_size=64,
                            lr=0.005, augment="none", val_fraction=0.05)
    return Path(result.run_dir)


def _copy_run(run: Path, dest: Path, **train_config: Any) -> Path:
    import json
    import shutil

    shutil.copytree(run, dest)
    for name in ("best.json", "last.json"):
        meta = json.loads((dest / name).read_text())
        meta["train_config"].update(train_config)
        (dest / name).write_text(json.dumps(meta))
    return dest


@pytest.fixture
def copy_run() -> Callable[..., Path]:
    """copy_run(run, dest, **train_config): a copy of a run whose checkpoints record other training
    settings (e.g. max_pixels=500), as a run trained with them would."""
    return _copy_run


@pytest.fixture
def old_relative_run(cnn_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of `cnn_run` whose checkpoints name DATA as older runs did (relative, as typed:
    "digits"), with the working folder at `tmp_path`, where that path does not exist yet."""
    old = _copy_run(cnn_run, tmp_path / "old-run", data="digits")
    monkeypatch.chdir(tmp_path)
    return old


def _write_other_digits(folder: Path) -> None:
    from PIL import Image

    for label in ("3", "4"):
        (folder / label).mkdir(parents=True)
        Image.new("L", (28, 28), int(label) * 30).save(folder / label / "a.png")


@pytest.fixture
def write_other_digits() -> Callable[[Path], None]:
    """Writes two one-image classes of plain grey squares into a folder: data no run trained on."""
    return _write_other_digits


def _write_digits(folder: Path, per_class: int, classes: tuple[str, ...] = ("3", "5")) -> list[tuple[Path, str]]:
    from PIL import Image

    from imagerec.data import read_data

    spec = read_data("mnist-mini")
    out = []
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        found = [it for it in spec.splits["test"] if spec.class_names[it.target] == c][:per_class]
        for k, it in enumerate(found):
            path = folder / c / f"{k}.png"
            Image.fromarray(spec.arrays["test"][it.source.index]).save(path)
            out.append((path, c))
    return out


@pytest.fixture
def write_digits() -> Callable[..., list[tuple[Path, str]]]:
    """`write_digits(folder, per_class, classes=("3", "5"))` writes `per_class` distinct real
    mnist-mini test digits of each class as folder/<class>/<n>.png; returns (path, class) pairs."""
    return _write_digits


def _untrained_run(root: Path, classes: tuple[str, ...] = ("a", "b"), in_chans: int = 3, img_size: int = 16,
                   resize: int | None = None, model: str = "mlp", **model_kwargs: Any) -> Path:
    """An untrained run written straight to root/best (no training): for tests of what reads runs."""
    import torch

    from imagerec.config import PreprocessConfig, TrainConfig
    from imagerec.engine.checkpoint import save_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    kwargs = {"in_chans": in_chans, "img_size": img_size, **model_kwargs}
    net = imagerec.create_model(model, num_classes=len(classes), **kwargs)
    mean, std = (0.5,) * in_chans, (0.25,) * in_chans
    pre = PreprocessConfig(img_size, in_chans, mean, std, resize or img_size, tuple(classes))
    save_checkpoint(root / "best", net, {"model": model, "model_kwargs": kwargs, "preprocess": pre.to_dict(),
                                         "train_config": TrainConfig(data="somewhere").to_dict()})
    return root


@pytest.fixture(scope="session")
def untrained_run() -> Callable[..., Path]:
    """`untrained_run(root, classes=("a", "b"), in_chans=3, img_size=16, resize=None, model="mlp")`: an
    untrained run saved as a checkpoint in `root`, in a moment (no training)."""
    return _untrained_run


@pytest.fixture
def read_only_folder(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], None]:
    """`read_only_folder(folder)`: opening a file directly in `folder` for writing through imagerec's
    atomic_write fails with EROFS from then on, as on a read-only mount (tests may run as root,
    which ignores chmod)."""
    import builtins
    import errno

    import imagerec.utils

    def make(folder: Path) -> None:
        real_open = builtins.open

        def fake_open(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN202
            if isinstance(file, str | Path) and Path(file).parent == folder and any(c in mode for c in "wxa"):
                raise OSError(errno.EROFS, "Read-only file system", str(file))
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(imagerec.utils, "open", fake_open, raising=False)  # atomic_write's open

    return make


@pytest.fixture
def nan_run(untrained_run: Callable[..., Path]) -> Callable[[Path], Path]:
    """`nan_run(root)`: an untrained run (classes a, b; 3x16x16) whose float weights are all NaN, as a
    diverged training leaves them."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    def make(root: Path) -> Path:
        run = untrained_run(root)
        weights = run / "best.safetensors"
        with safe_open(weights, "pt") as f:
            metadata = f.metadata()
        tensors = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                   for k, v in load_file(weights).items()}
        save_file(tensors, weights, metadata=metadata)
        return run

    return make


@contextlib.contextmanager
def _postgres_scratch(create: str, drop: str) -> Iterator[str]:
    """Runs `create` (e.g. CREATE SCHEMA s) on the PostgreSQL server at PG_ADMIN_URL, yields that URL,
    and runs `drop` afterwards. Skips with IMAGEREC_SKIP_POSTGRES=1; an unreachable server FAILS the test."""
    import sqlalchemy as sa

    if os.environ.get("IMAGEREC_SKIP_POSTGRES") == "1":
        pytest.skip("IMAGEREC_SKIP_POSTGRES=1")
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(create)
    except sa.exc.OperationalError as e:
        admin.dispose()
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_ADMIN_URL} ({e.orig}). Start it with "
            "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, "
            "or set IMAGEREC_SKIP_POSTGRES=1 to skip the PostgreSQL tests"
        )
    try:
        yield PG_ADMIN_URL
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(drop)
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_scratch() -> Callable[[str, str], contextlib.AbstractContextManager[str]]:
    """postgres_scratch(create, drop): a context that creates a database or schema on the test
    PostgreSQL server (yielding the admin URL) and drops it afterwards; the store fixtures and the
    CLI tests share it."""
    return _postgres_scratch
