"""`--recipe fast --optimizer adamw`: the recipe's SGD lr (0.6 on grayscale), coupled decay and 64x
BatchNorm lr were filled in for AdamW, which then stayed at chance accuracy (loss 2.3026 for 4
epochs on mnist-mini). Another optimizer keeps its own defaults; the rest of the recipe stays."""

from __future__ import annotations

import logging

import pytest

from imagerec.config import TrainConfig, apply_overrides
from imagerec.engine.optim import DEFAULT_LR, DEFAULT_WD, resolve_lr_wd
from imagerec.engine.recipes import apply_recipe


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("optimizer", ["adamw", "adam", "adagrad"])
def test_fast_recipe_with_another_optimizer_keeps_that_optimizers_lr_and_decay(
        optimizer: str, channels: int, caplog: pytest.LogCaptureFixture) -> None:
    given = apply_overrides(TrainConfig(recipe="fast"), {"optimizer": optimizer}, "the command line")
    with caplog.at_level(logging.WARNING, logger="imagerec"):
        cfg = apply_recipe(given, channels=channels, size=28, has_test_split=True)
    assert cfg.optimizer == optimizer
    assert resolve_lr_wd(cfg) == (DEFAULT_LR[optimizer], DEFAULT_WD[optimizer])
    assert cfg.norm_lr_scale == 1.0
    assert (cfg.model, cfg.schedule, cfg.lookahead) == ("airbench", "triangle", True)  # the rest of the recipe
    assert f"--optimizer {optimizer}" in caplog.text


def test_fast_recipe_with_sgd_or_a_given_lr_is_unchanged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="imagerec"):
        sgd = apply_recipe(apply_overrides(TrainConfig(recipe="fast"), {"optimizer": "sgd"}, "the command line"),
                           channels=1, size=28, has_test_split=True)
    assert (sgd.lr, sgd.norm_lr_scale, sgd.momentum) == (0.6, 64.0, 0.85)
    assert "tuned for SGD" not in caplog.text
    adam = apply_recipe(apply_overrides(TrainConfig(recipe="fast"), {"optimizer": "adam", "lr": 0.01}, "the command line"),
                        channels=3, size=32, has_test_split=True)
    assert adam.lr == 0.01  # the user's own lr wins
