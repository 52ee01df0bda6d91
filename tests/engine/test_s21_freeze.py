"""--freeze-backbone keeps the backbone's BatchNorm statistics as pretrained; only the head trains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

import imagerec
from imagerec.models import create_model
from imagerec.models.pretrained import set_frozen_norms_eval

SMALL = {"epochs": 1, "batch_size": 16, "augment": "none", "val_fraction": 0.2, "workers": 0}


def _tiny_folder(root: Path, seed: int) -> Path:
    """40 random 28x28 grey images in two classes (two training steps of 16)."""
    rng = np.random.default_rng(seed)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def test_set_frozen_norms_eval_leaves_the_head_alone() -> None:
    model = create_model("mlp", num_classes=3, in_chans=1, img_size=28).train()
    assert set_frozen_norms_eval(model) > 0
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert norms and not any(m.training for m in norms)
    assert model.get_classifier().training


def test_frozen_backbone_buffers_unchanged_head_trained(tmp_path: Path) -> None:
    imagerec.train(data=str(_tiny_folder(tmp_path / "d1", 0)), out=str(tmp_path / "base"), model="cnn", **SMALL)
    imagerec.train(data=str(_tiny_folder(tmp_path / "d2", 1)), out=str(tmp_path / "ft"), model="cnn",
                   pretrained=str(tmp_path / "base"), freeze_backbone=True, **SMALL)
    a = load_file(str(tmp_path / "base" / "best.safetensors"))
    b = load_file(str(tmp_path / "ft" / "last.safetensors"))
    backbone = [k for k in a if k.startswith("model.") and not k.startswith("model.head")]
    stats = [k for k in backbone if k.endswith(("running_mean", "running_var"))]
    assert stats  # the cnn has BatchNorm
    changed = [k for k in backbone if not torch.equal(a[k], b[k])]  # weights, running stats, batch counters
    assert changed == []
    head = [k for k in a if k.startswith("model.head")]
    assert head and any(not torch.equal(a[k], b[k]) for k in head)
