"""train() with airbench (QA s21): the eval TTA follows the run's flips and is saved with the model
(aug bug 1); --pretrained keeps the pretrained whitening stem instead of recomputing it (aug bug 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from imagerec.engine.checkpoint import load_model
from imagerec.engine.run import train
from imagerec.models import create_model

TINY = {"model": "airbench", "epochs": 1, "batch_size": 8, "num_threads": 1, "workers": 0, "val_fraction": 0.0,
        "lr": 0.01, "augment": "light"}


def _images(root: Path, seed: int = 0, n: int = 6) -> Path:
    """root/<a|b>/<i>.png: n 16x16 RGB noise images per class."""
    rng = np.random.default_rng(seed)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize("hflip, tta", [(False, "translate"), (True, "flip-translate")])
def test_eval_tta_follows_the_runs_flips(tmp_path: Path, hflip: bool, tta: str) -> None:
    run = Path(train(data=str(_images(tmp_path / "d")), out=str(tmp_path / "r"), hflip=hflip, **TINY).run_dir)
    for name in ("best.json", "last.json"):
        assert json.loads((run / name).read_text())["model_kwargs"]["tta"] == tta
    assert load_model(run)[0].tta == tta  # what eval, predict, export and serve build


def test_old_checkpoint_without_tta_keeps_its_tta(tmp_path: Path) -> None:
    run = Path(train(data=str(_images(tmp_path / "d")), out=str(tmp_path / "r"), hflip=False, **TINY).run_dir)
    for name in ("best.json", "last.json"):  # as a run from before the TTA was recorded
        meta = json.loads((run / name).read_text())
        del meta["model_kwargs"]["tta"]
        (run / name).write_text(json.dumps(meta))
    assert load_model(run)[0].tta == "flip-translate"


def test_pretrained_whitening_stem_is_kept(tmp_path: Path) -> None:
    source = create_model("airbench", num_classes=5, in_chans=3, img_size=16)
    stem = torch.randn_like(source.whiten.weight)
    source.whiten.weight.data.copy_(stem)
    weights = tmp_path / "src.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    run = Path(train(data=str(_images(tmp_path / "d")), out=str(tmp_path / "r"), pretrained=str(weights), **TINY).run_dir)
    assert torch.equal(load_file(str(run / "last.safetensors"))["model.whiten.weight"], stem)

    # Weights without the stem: it is still computed from the data (init_from_data's +/- eigenvector pairs).
    save_file({k: v.contiguous() for k, v in source.state_dict().items() if k != "whiten.weight"}, str(weights))
    tuned = Path(train(data=str(tmp_path / "d"), out=str(tmp_path / "r2"), pretrained=str(weights), **TINY).run_dir)
    got = load_file(str(tuned / "last.safetensors"))["model.whiten.weight"]
    half = got.shape[0] // 2
    assert torch.equal(got[half:], -got[:half]) and got.abs().max() > 0  # random init has no such pairs
