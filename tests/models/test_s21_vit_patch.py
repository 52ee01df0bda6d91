"""ViT models refuse an image size that is not a whole number of patches (pixels past the last
whole patch would never reach the model)."""

from __future__ import annotations

import pytest
import torch

from imagerec.models import create_model
from imagerec.utils import ImageRecError


@pytest.mark.parametrize(
    ("name", "size", "patch", "sizes"),
    [
        ("vit-tiny", 30, 4, "28 or 32"),  # 4 px patches up to 64 px
        ("vit-tiny", 66, 16, "64 or 80"),  # 64 takes 4 px patches, 80 takes 16 px ones
        ("vit-tiny", 100, 16, "96 or 112"),
        ("timm/vit_tiny_patch16_224", 28, 16, "16 or 32"),
    ],
)
def test_size_not_a_multiple_of_the_patch_is_refused(name: str, size: int, patch: int, sizes: str) -> None:
    with pytest.raises(ImageRecError) as e:
        create_model(name, num_classes=3, in_chans=1, img_size=size, depth=1)
    msg = str(e.value)
    assert f"--image-size {sizes} " in msg
    assert f"{patch}x{patch} px patches" in msg and f"a multiple of {patch} px" in msg


@pytest.mark.parametrize(("name", "size"), [("vit-tiny", 28), ("vit-tiny", 96), ("timm/vit_tiny_patch16_224", 32)])
def test_every_pixel_reaches_the_model_at_a_valid_size(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_chans=1, img_size=size, depth=1).eval()
    a = torch.zeros(1, 1, size, size)
    b = a.clone()
    b[..., -1, -1] = 5.0  # only the bottom-right pixel differs
    with torch.no_grad():
        assert not torch.equal(model(a), model(b))


def test_a_run_trained_before_the_check_still_loads(tmp_path) -> None:
    # A vit-tiny run at 30 px (trained before session 21 refused the size) keeps loading for eval,
    # predict and export, as it was trained; only new models are refused.
    from imagerec.config import PreprocessConfig, TrainConfig
    from imagerec.engine.checkpoint import load_model, save_checkpoint
    from imagerec.models.timm_models import trained_models_allowed

    with trained_models_allowed():
        model = create_model("vit-tiny", num_classes=2, in_chans=1, img_size=30, depth=1)
    pre = PreprocessConfig(30, 1, (0.5,), (0.25,), 30, ("a", "b"))
    save_checkpoint(tmp_path / "best", model, {"model": "vit-tiny", "model_kwargs": {"in_chans": 1, "img_size": 30,
                                                                                       "depth": 1},
                                               "preprocess": pre.to_dict(), "train_config": TrainConfig(data="x").to_dict()})
    loaded, _ = load_model(tmp_path)
    assert torch.equal(loaded.state_dict()["pos_embed"], model.state_dict()["pos_embed"])
    with pytest.raises(ImageRecError, match="--image-size 28 or 32"):  # the check is back on afterwards
        create_model("vit-tiny", num_classes=2, in_chans=1, img_size=30, depth=1)
