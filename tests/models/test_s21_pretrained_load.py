"""load_pretrained: backbone tensors skipped for their shape are warned about, a ViT position
embedding trained at another image size is resampled, and NaN/inf weights are refused."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from imagerec.models import create_model, load_pretrained
from imagerec.utils import ImageRecError


def _save(model: nn.Module, path: Path) -> Path:
    save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_backbone_shape_mismatch_is_warned_with_names(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = create_model("cnn", num_classes=10, in_chans=3, img_size=32, widths=(32, 64, 96))
    path = _save(src, tmp_path / "w.safetensors")
    dst = create_model("cnn", num_classes=5, in_chans=3, img_size=32)
    with caplog.at_level(logging.INFO, logger="imagerec"):
        report = load_pretrained(dst, str(path))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "stages.2.0.0.weight (file 96x64x3x3, model 128x64x3x3)" in warnings[0]
    assert "head." not in warnings[0]  # the classifier is meant to be skipped
    assert "stages.2.0.0.weight (file 96x64x3x3, model 128x64x3x3)" in report["mismatched"]


def test_matching_weights_load_without_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _save(create_model("cnn", num_classes=10, in_chans=3, img_size=32), tmp_path / "w.safetensors")
    with caplog.at_level(logging.INFO, logger="imagerec"):
        load_pretrained(create_model("cnn", num_classes=5, in_chans=3, img_size=32), str(path))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(("name", "src_size", "dst_size", "grids"), [
    ("vit-tiny", 28, 32, "7x7 -> 8x8"),  # no class token in the grid: 1 prefix token
    ("timm/vit_tiny_patch16_224", 32, 64, "2x2 -> 4x4"),
])
def test_vit_position_embedding_is_resampled(tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str,
                                             src_size: int, dst_size: int, grids: str) -> None:
    torch.manual_seed(0)
    src = create_model(name, num_classes=10, in_chans=1, img_size=src_size, depth=1)
    with torch.no_grad():
        src.pos_embed.normal_()
    path = _save(src, tmp_path / "vit.safetensors")
    dst = create_model(name, num_classes=3, in_chans=1, img_size=dst_size, depth=1)
    with caplog.at_level(logging.INFO, logger="imagerec"):
        report = load_pretrained(dst, str(path))
    assert "pos_embed" not in report["missing"] and "pos_embed" not in report["skipped"]
    assert report["resampled"] == [f"pos_embed ({grids} patches)"]
    assert torch.equal(dst.pos_embed[:, :1], src.pos_embed[:, :1])  # the class token's embedding is kept
    side = dst_size // dst.patch_embed.patch_size[0]
    grid = dst.pos_embed[0, 1:].reshape(side, side, -1)
    old = src.pos_embed[0, 1:].reshape(src.patch_embed.grid_size[0], src.patch_embed.grid_size[1], -1)
    assert grid.mean().item() == pytest.approx(old.mean().item(), abs=0.1)  # resampled, not random init
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(f"pos_embed ({grids} patches)" in m for m in info)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path: Path, bad: float) -> None:
    src = create_model("cnn", num_classes=10, in_chans=1, img_size=28)
    state = {f"model.{k}": v.contiguous() for k, v in src.state_dict().items()}
    state["model.stages.1.0.0.weight"][0, 0, 0, 0] = bad
    save_file(state, str(tmp_path / "bad.safetensors"))
    dst = create_model("cnn", num_classes=10, in_chans=1, img_size=28)
    before = dst.stages[0][0][0].weight.clone()
    with pytest.raises(ImageRecError, match=r"bad\.safetensors'?: tensor stages\.1\.0\.0\.weight holds NaN/inf"):
        load_pretrained(dst, str(tmp_path / "bad.safetensors"))
    assert torch.equal(dst.stages[0][0][0].weight, before)  # nothing was loaded
