"""Shared fixtures for export tests: one small trained CNN run on mnist-mini, and PNG digits."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

import imagerec
from imagerec.data import read_data


@pytest.fixture(scope="session")
def cnn_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `cnn` trained for 3 epochs on 1,000 mnist-mini digits (~93% val accuracy, ~12 s on 2 cores).

    A barely trained model has many near-tied classes that int8 rounding flips; this one is
    trained enough that the int8 gate measures quantization, not coin tosses."""
    out = tmp_path_factory.mktemp("export-run") / "cnn"
    result = imagerec.train(data="mnist-mini", out=str(out), model="cnn", epochs=3, limit_train=1000, batch_size=64,
                            lr=0.005, augment="none", val_fraction=0.05)
    return Path(result.run_dir)


@pytest.fixture(scope="session")
def digit_pngs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """40 real mnist-mini test digits written as PNG files, as a user would have them."""
    spec = read_data("mnist-mini")
    folder = tmp_path_factory.mktemp("digits")
    paths = []
    for k, item in enumerate(spec.splits["test"][:40]):
        ref = item.source
        p = folder / f"digit{k:02d}_{spec.class_names[item.target]}.png"
        Image.fromarray(spec.arrays[ref.key][ref.index]).save(p)
        paths.append(p)
    return paths
