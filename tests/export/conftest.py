"""Shared fixtures for export tests: PNG digits (the trained `cnn_run` is in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from imagerec.data import read_data


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
