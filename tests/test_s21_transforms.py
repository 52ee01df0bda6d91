"""imagerec.transforms: training runs the preprocessing ops where eval does (on the input_size image,
after the crop), and a cutout as large as the input is refused (QA aug #5, #7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imagerec.config import PreprocessConfig
from imagerec.transforms import BatchAugment, base_transform, check_cutout, item_augment, train_transforms
from imagerec.utils import ImageRecError


def pre(size: int, resize: int, ops: tuple[str, ...] = (), channels: int = 1) -> PreprocessConfig:
    return PreprocessConfig(size, channels, (0.5,) * channels, (0.5,) * channels, resize, ("a", "b"), ops=ops)


def blocks(side: int = 150, mode: str = "L") -> Image.Image:
    """Sharp-edged random blocks: canny finds edges at any scale."""
    rng = np.random.default_rng(1)
    cells = rng.integers(0, 2, (10, 10)).astype(np.uint8) * 255
    img = Image.fromarray(cells).resize((side, side), Image.NEAREST)
    return img.convert(mode)


@pytest.mark.parametrize("preset", ["light", "standard", "strong"])
def test_large_images_run_the_ops_after_the_training_crop(preset: str) -> None:
    p = pre(96, 110, ("canny",))
    size, base, augment = train_transforms(p, preset)
    assert size == 110 and augment is not None
    stored = base(blocks())
    assert stored.shape == (1, 110, 110)
    assert torch.equal(stored, base_transform(p, size=110, with_ops=False)(blocks()))  # the base holds no ops
    if preset == "strong":
        return  # TrivialAugment after the ops may rescale values; the order is what the others check
    for seed in range(5):
        torch.manual_seed(seed)
        x = augment(stored)
        assert x.shape == (1, 96, 96)
        assert set(x.unique().tolist()) == {0, 255}  # crisp binary edges, as eval gives, not resampled grey
    assert set(base_transform(p)(blocks()).unique().tolist()) == {0, 255}


def test_ops_after_the_crop_equal_eval_ops_on_that_crop() -> None:
    p, plain = pre(96, 110, ("median:5",)), pre(96, 110)
    _, base, augment = train_transforms(p, "light")
    _, _, plain_augment = train_transforms(plain, "light")
    stored = base(blocks(mode="L"))
    torch.manual_seed(3)
    x = augment(stored)
    torch.manual_seed(3)  # the same crop, no ops
    crop = plain_augment(stored)
    expected = base_transform(pre(96, 96, ("median:5",)))(Image.fromarray(crop[0].numpy()))
    assert torch.equal(x, expected)


def test_small_images_and_no_augment_keep_the_ops_in_the_base() -> None:
    small = pre(32, 32, ("canny",), channels=3)
    size, base, augment = train_transforms(small, "light")
    assert size == 32 and augment is None
    img = blocks(48, "RGB")
    assert torch.equal(base(img), base_transform(small)(img))  # what the RAM cache holds = eval's input
    big = pre(96, 110, ("canny",))
    size, base, augment = train_transforms(big, "none")
    assert size == 96 and augment is None and torch.equal(base(blocks()), base_transform(big)(blocks()))
    assert item_augment(small, "strong") is not None  # TrivialAugment runs after the base's ops


@pytest.mark.parametrize(("cutout", "size"), [(28, 28), (100, 32), (224, 224)])
def test_cutout_as_large_as_the_input_is_refused(cutout: int, size: int) -> None:
    with pytest.raises(ImageRecError, match=rf"^--cutout {cutout} is not smaller than the model's {size}x{size} px input"):
        check_cutout(cutout, size)
    with pytest.raises(ImageRecError, match=rf"--cutout {cutout} "):
        BatchAugment(pre(size, size), "none", hflip=False, cutout=cutout)


def test_cutout_below_the_input_size_keeps_part_of_every_image() -> None:
    aug = BatchAugment(pre(32, 32), "none", hflip=False, mixup=0, cutmix=0, cutout=31)
    x = torch.randint(0, 256, (16, 1, 32, 32), dtype=torch.uint8)
    out = aug.geometric(x)
    kept = (out == x).flatten(1).sum(1)
    assert int(kept.min()) >= 32 * 32 - 31 * 31
