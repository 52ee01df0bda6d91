"""--recipe fast with --early-stopping on data with a test split (QA s21, aug bug 11): the recipe keeps
the val split the user asked for, and no message blames a --val-fraction the user never gave."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagerec.config import TrainConfig, apply_overrides
from imagerec.engine.recipes import apply_recipe
from imagerec.engine.run import train
from imagerec.utils import ImageRecError

TINY = {"num_threads": 1, "workers": 0, "batch_size": 8}


def _split_data(root: Path, n: int = 10) -> Path:
    """root/{train,test}/<0|1>/<i>.png: 28x28 grayscale noise digits."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("test", 3)):
        for c in ("0", "1"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_recipe_keeps_the_val_split_for_early_stopping() -> None:
    cfg = apply_overrides(TrainConfig(), {"recipe": "fast", "early_stopping": 2}, "test")
    assert apply_recipe(cfg, channels=1, size=28, has_test_split=True).val_fraction == TrainConfig().val_fraction
    # The user's own value stays, whatever it is; without early stopping the recipe trains on all images.
    cfg = apply_overrides(TrainConfig(), {"recipe": "fast", "val_fraction": 0.2}, "test")
    assert apply_recipe(cfg, channels=1, size=28, has_test_split=True).val_fraction == 0.2
    cfg = apply_overrides(TrainConfig(), {"recipe": "fast"}, "test")
    assert apply_recipe(cfg, channels=1, size=28, has_test_split=True).val_fraction == 0.0


def test_fast_recipe_with_early_stopping_trains_with_a_val_split(tmp_path: Path) -> None:
    data = _split_data(tmp_path / "d")
    r = train(data=str(data), out=str(tmp_path / "r"), recipe="fast", early_stopping=2, **TINY)
    assert r.metrics["val"]["accuracy"] >= 0 and "test" in r.metrics
    assert r.metrics["train_images"] < 20  # some of the 20 training images were held out


def test_resume_with_early_stopping_names_the_recipe_not_val_fraction(tmp_path: Path) -> None:
    data = _split_data(tmp_path / "d")
    run = train(data=str(data), out=str(tmp_path / "r"), recipe="fast", **TINY).run_dir  # no val split
    with pytest.raises(ImageRecError) as e:
        train(resume=str(run), epochs=2, early_stopping=2)
    assert "--recipe fast holds none out when the data has a test split" in str(e.value)
    assert "--val-fraction is" not in str(e.value)


def test_explicit_val_fraction_zero_is_named(tmp_path: Path) -> None:
    data = _split_data(tmp_path / "d")
    with pytest.raises(ImageRecError, match=r"has no val split and --val-fraction is 0\. Hold some out"):
        train(data=str(data), out=str(tmp_path / "r"), model="mlp", epochs=1, val_fraction=0.0, early_stopping=2, **TINY)
