"""A bundle given where a run is expected (eval, export, --pretrained) is named as a bundle, with its run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagerec.engine.checkpoint import find_run_checkpoint
from imagerec.models import create_model, load_pretrained
from imagerec.utils import ImageRecError


def _bundle(folder: Path) -> Path:
    """A folder with a bundle manifest, as `imagerec export` writes (only the fields read here)."""
    folder.mkdir()
    (folder / "imagerec.json").write_text(json.dumps({"format": "imagerec-bundle", "source": {"run_dir": "/runs/mnist"}}))
    return folder


def test_find_run_checkpoint_names_the_bundles_run(tmp_path: Path) -> None:
    with pytest.raises(ImageRecError, match=r"exported bundle, not a run; pass its run, /runs/mnist"):
        find_run_checkpoint(_bundle(tmp_path / "b"))


def test_pretrained_bundle_is_named_as_one(tmp_path: Path) -> None:
    model = create_model("cnn", num_classes=2, in_chans=1, img_size=8)
    with pytest.raises(ImageRecError, match=r"is an exported bundle, not a run.*source.run_dir"):
        load_pretrained(model, str(_bundle(tmp_path / "b")))
