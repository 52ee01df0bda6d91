"""imagerec.train's first argument: a TrainConfig beside resume= was dropped without a word (the run
resumed with its saved settings), and a dict of settings crashed with an AttributeError."""

from __future__ import annotations

from pathlib import Path

import pytest

import imagerec
from imagerec.config import TrainConfig
from imagerec.utils import ImageRecError


def test_a_train_config_beside_resume_is_refused_not_ignored(tmp_path: Path) -> None:
    # refused before the run folder is read: no run is needed
    with pytest.raises(ImageRecError, match=r"TrainConfig given with it would be ignored.*epochs=20"):
        imagerec.train(TrainConfig(data="mnist-mini", epochs=3), resume=str(tmp_path / "run"))


def test_a_dict_of_settings_is_an_error_naming_the_fix() -> None:
    with pytest.raises(ImageRecError, match=r"must be a TrainConfig, got dict.*train\(\*\*settings\)"):
        imagerec.train({"data": "mnist-mini", "epochs": 1})
