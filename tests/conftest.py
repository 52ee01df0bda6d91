"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


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
