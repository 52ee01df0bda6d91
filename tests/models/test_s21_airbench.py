"""airbench's eval TTA follows the training flips (QA s21, aug bug 1); old checkpoints keep theirs."""

from __future__ import annotations

import pytest
import torch

from imagerec.models import create_model
from imagerec.models.airbench import tta_for_training


@pytest.mark.parametrize("tta, hflip, expected", [
    ("flip-translate", False, "translate"),
    ("flip-translate", True, "flip-translate"),
    ("translate", True, "flip-translate"),
    ("translate", False, "translate"),
    ("flip", False, "none"),
    ("none", True, "none"),
])
def test_tta_for_training(tta: str, hflip: bool, expected: str) -> None:
    assert tta_for_training(hflip, tta) == expected


def test_match_training_flips_drops_the_mirror_views() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = create_model("airbench", num_classes=4, in_chans=3, img_size=32).eval()
    assert model.tta == "flip-translate"  # a colour model built without a recorded tta: as before
    assert model.match_training_flips(False) == "translate" and model.tta == "translate"
    # Now eval is the translate-only TTA: the image and its two one-pixel shifts, no mirrors.
    plain = lambda v: model.forward_head(model._features(v))  # noqa: E731
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    expect = 0.5 * plain(x) + 0.25 * (plain(padded[..., :32, :32]) + plain(padded[..., 2:, 2:]))
    assert torch.allclose(model(x), expect, atol=1e-5)
    assert model.match_training_flips(True) == "flip-translate"


def test_recorded_tta_rebuilds_the_same_model() -> None:
    """model_kwargs with tta (new checkpoints) rebuild that TTA; without it, the channel-based default."""
    assert create_model("airbench", num_classes=2, in_chans=3, img_size=32, tta="translate").tta == "translate"
    assert create_model("airbench94", num_classes=2, in_chans=3, img_size=32, tta="translate").tta == "translate"
    assert create_model("airbench", num_classes=2, in_chans=3, img_size=32).tta == "flip-translate"
    assert create_model("airbench", num_classes=2, in_chans=1, img_size=28).tta == "translate"
