"""--pretrained with a file that holds only part of the backbone says which tensors stay random."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from safetensors.torch import save_file

from imagerec.models import create_model, load_pretrained


def test_partial_state_dict_warns_of_the_absent_backbone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = create_model("cnn", num_classes=10, in_chans=1, img_size=28).state_dict()
    save_file({k: v for k, v in state.items() if k.startswith("stem.")}, str(tmp_path / "stem.safetensors"))
    with caplog.at_level(logging.WARNING, logger="imagerec"):
        load_pretrained(create_model("cnn", num_classes=3, in_chans=1, img_size=28), str(tmp_path / "stem.safetensors"))
    text = caplog.text
    assert "not in the file" in text and "stages.0.0.0.weight" in text
    assert "head." not in text  # the classifier is rebuilt for the new classes anyway


def test_whole_backbone_loads_without_that_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = create_model("cnn", num_classes=10, in_chans=1, img_size=28).state_dict()
    save_file(state, str(tmp_path / "all.safetensors"))
    with caplog.at_level(logging.WARNING, logger="imagerec"):
        load_pretrained(create_model("cnn", num_classes=3, in_chans=1, img_size=28), str(tmp_path / "all.safetensors"))
    assert "not in the file" not in caplog.text
