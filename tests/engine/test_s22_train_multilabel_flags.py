"""Settings that do not apply to multi-label data are said, and recorded as they ran: --balance
sampler (no per-class draw exists for images of several classes) and --label-smoothing (BCE)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import imagerec
from imagerec.config import TrainConfig
from imagerec.engine.balance import resolve_balance


def _multi_label_csv(root: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = ["path,label"]
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / f"{i}.png")
        labels = ["a", "b"] if i % 2 else ["a"]
        rows.append(f"{i}.png,{';'.join(labels + (['c'] if i % 8 == 0 else []))}")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    return root / "m.csv"


def test_balance_sampler_on_multi_label_data_is_class_weights_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="imagerec"):
        balance, metric = resolve_balance(TrainConfig(balance="sampler"), np.array([40, 20, 5]), True)
    assert (balance, metric) == ("weights", "map")
    assert "--balance sampler" in caplog.text and "multi-label" in caplog.text
    # single-label data draws balanced batches as asked
    assert resolve_balance(TrainConfig(balance="sampler"), np.array([40, 5]), False)[0] == "sampler"


def test_multi_label_run_records_weights_and_warns_of_unused_label_smoothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    csv = _multi_label_csv(tmp_path)
    with caplog.at_level(logging.WARNING, logger="imagerec"):
        imagerec.train(data=str(csv), out=str(tmp_path / "run"), epochs=1, batch_size=16, num_threads=1,
                       balance="sampler", label_smoothing=0.3)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["balance"] == "weights"  # what ran: BCE pos_weight
    assert "--label-smoothing 0.3 is not used" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imagerec"):  # the default is not the user's: no warning
        imagerec.train(data=str(csv), out=str(tmp_path / "run2"), epochs=1, batch_size=16, num_threads=1)
    assert "label-smoothing" not in caplog.text
