"""engine/loaders: channel inference reads every image's mode (QA aug #3); the training loader
refuses a cutout as large as the input before reading images (#5) and, with a RAM cache, trains
on ops run after the random crop (#7)."""

from __future__ import annotations

import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagerec.config import PreprocessConfig, TrainConfig
from imagerec.data import read_data
from imagerec.engine.loaders import create_run_loader, infer_geometry
from imagerec.utils import ImageRecError


def mostly_gray(root: Path, colour: int = 2, gray: tuple[int, int] = (40, 30)) -> Path:
    """Classes a and b of grayscale 28 px squares, then class z of `colour` RGB ones: listed last,
    where a probe of every other image (32 at most) never looks."""
    for cls, n in zip(("a", "b"), gray, strict=True):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (28, 28), 3 * i).save(root / cls / f"{i:02d}.png")
    (root / "z").mkdir()
    for i in range(colour):
        Image.new("RGB", (28, 28), (255, 0, 0) if i % 2 else (0, 130, 0)).save(root / "z" / f"{i}.png")
    return root


def test_one_colour_image_among_many_grayscale_makes_the_run_3_channel(tmp_path: Path) -> None:
    spec = read_data(str(mostly_gray(tmp_path / "mixed")))
    assert len(spec.splits["train"]) == 72
    assert infer_geometry(spec) == (3, 28)


def test_all_grayscale_is_1_channel_and_a_sampled_decision_warns(tmp_path: Path, caplog) -> None:
    spec = read_data(str(mostly_gray(tmp_path / "gray", colour=0, gray=(40, 32))))
    with caplog.at_level(logging.WARNING, logger="imagerec"):
        assert infer_geometry(spec) == (1, 28)
    assert not caplog.records  # every image was checked: nothing to warn about
    with caplog.at_level(logging.WARNING, logger="imagerec"):
        assert infer_geometry(spec, limit=10) == (1, 28)
    assert "the 9 training images checked (every 8-th of 72) are all grayscale" in caplog.text
    assert "--channels 3" in caplog.text


def test_colour_images_in_a_tar_are_found(tmp_path: Path) -> None:
    root = mostly_gray(tmp_path / "src", colour=1)
    big = np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8)  # a member over 64 KB
    Image.fromarray(big).save(root / "b" / "big.png")
    with tarfile.open(tmp_path / "d.tar", "w") as tar:
        for p in sorted(root.rglob("*.png")):
            tar.add(p, arcname=str(p.relative_to(root)))
    assert infer_geometry(read_data(str(tmp_path / "d.tar")))[0] == 3
    (root / "z" / "0.png").unlink()
    with tarfile.open(tmp_path / "g.tar", "w") as tar:
        for p in sorted(root.rglob("*.png")):
            tar.add(p, arcname=str(p.relative_to(root)))
    assert infer_geometry(read_data(str(tmp_path / "g.tar")))[0] == 1


def test_the_training_loader_refuses_a_cutout_as_large_as_the_input(tmp_path: Path, monkeypatch) -> None:
    spec = read_data(str(mostly_gray(tmp_path / "d", colour=0)))
    pre = PreprocessConfig(28, 1, (0.5,), (0.5,), 28, tuple(spec.class_names))
    import imagerec.engine.loaders as loaders

    def no_loader(*args, **kwargs):
        raise AssertionError("the images were read before the cutout was checked")

    monkeypatch.setattr(loaders, "ImageLoader", no_loader)
    with pytest.raises(ImageRecError, match=r"^--cutout 28 is not smaller than the model's 28x28 px input"):
        create_run_loader(spec, spec.splits["train"], pre, TrainConfig(cutout=28), train=True)


def test_ram_cache_trains_on_ops_after_the_random_crop(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "big" / cls).mkdir(parents=True)
        for i in range(4):
            cells = rng.integers(0, 2, (10, 10)).astype(np.uint8) * 255
            Image.fromarray(cells).resize((150, 150), Image.NEAREST).save(tmp_path / "big" / cls / f"{i}.png")
    spec = read_data(str(tmp_path / "big"))
    pre = PreprocessConfig(96, 1, (0.5,), (0.5,), 110, tuple(spec.class_names), ops=("canny",))
    cfg = TrainConfig(cache="ram", batch_size=4, workers=0, augment="light")
    loader = create_run_loader(spec, spec.splits["train"], pre, cfg, train=True)
    assert loader.cache is not None and loader.cache.shape == (8, 1, 110, 110)
    assert float((loader.cache > 127).float().mean()) > 0.3  # the white blocks as stored, not their sparse edges
    batches = torch.cat([b.x for b in loader.epoch(0)])
    assert batches.shape[1:] == (1, 96, 96)
    assert set(batches.unique().tolist()) == {0, 255}  # canny's binary edges, as eval gives
    evaluation = create_run_loader(spec, spec.splits["train"], pre, cfg, train=False)
    assert set(torch.cat([b.x for b in evaluation.epoch(0)]).unique().tolist()) == {0, 255}
