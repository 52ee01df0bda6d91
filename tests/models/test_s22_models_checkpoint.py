"""A checkpoint whose weights disagree with its JSON says which tensors differ and what to do."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from imagerec.engine.checkpoint import load_model
from imagerec.utils import ImageRecError


def test_weights_and_json_disagreeing_name_the_tensors(tmp_path: Path, untrained_run: Callable[..., Path]) -> None:
    run = untrained_run(tmp_path / "run", classes=("a", "b", "c"), in_chans=1, img_size=8, model="cnn")
    meta = json.loads((run / "best.json").read_text())
    meta["preprocess"]["class_names"] = ["a", "b"]  # the JSON edited: 2 classes, the weights' head has 3
    (run / "best.json").write_text(json.dumps(meta))
    with pytest.raises(ImageRecError) as info:
        load_model(run)
    msg = str(info.value)
    assert "size mismatch for head.weight" in msg and "(2 classes" in msg
    assert "use the run's other checkpoint" in msg
