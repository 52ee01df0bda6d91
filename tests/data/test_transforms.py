"""imagerec.transforms: the base transform, preprocessing ops and the batch augmentation.

(Kept beside the data tests because this change may only add files under tests/data/; it belongs
in tests/test_transforms.py.)
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms.v2 import functional as F

from imagerec.config import PreprocessConfig, TrainConfig, legacy_mixing, resolve_mixing
from imagerec.data import read_data
from imagerec.transforms import OPS, BatchAugment, apply_ops, base_transform, parse_op
from imagerec.utils import ImageRecError


def cfg(size: int = 32, resize: int | None = None, channels: int = 3, ops: tuple[str, ...] = ()) -> PreprocessConfig:
    return PreprocessConfig(size, channels, (0.5,) * channels, (0.5,) * channels, resize or size, ("a", "b"), ops=ops)


def scene(mode: str) -> Image.Image:
    """A 48x48 test picture with flat areas, edges, a gradient and noise."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:48, 0:48]
    base = (x * 3 + (y > 24) * 90 + ((x // 8 + y // 8) % 2) * 60).astype(float)
    rgb = np.stack([base, base[::-1] * 0.7, np.full_like(base, 90.0)], -1) + rng.normal(0, 12, (48, 48, 3))
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    return img if mode == "RGB" else img.convert("L")


def test_base_transform_shape_dtype_and_crop() -> None:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    out = base_transform(cfg(32, 36))(rgb)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    # the shorter side already equals resize_size: no resampling, a pure centre crop
    square = np.random.default_rng(1).integers(0, 256, (36, 36), dtype=np.uint8)
    out = base_transform(cfg(32, 36, channels=1))(Image.fromarray(square, "L"))
    assert out.shape == (1, 32, 32)
    assert np.array_equal(out[0].numpy(), square[2:34, 2:34])
    flat = base_transform(cfg(16, 20))(Image.new("RGB", (70, 30), (12, 34, 56)))
    assert flat.shape == (3, 16, 16) and flat[:, 5, 5].tolist() == [12, 34, 56] and (flat == flat[:, :1, :1]).all()


def test_base_transform_applies_ops_and_rejects_bad_ones() -> None:
    img = scene("RGB").resize((32, 32))
    out = base_transform(cfg(32, ops=("grayscale",)))(img)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert not torch.equal(out, base_transform(cfg(32))(img))
    with pytest.raises(ImageRecError, match="Did you mean 'sobel'"):
        base_transform(cfg(32, ops=("sobl",)))


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_every_op_runs_and_changes_pixels(op: str, mode: str) -> None:
    img = scene(mode)
    out = apply_ops(img, [op])
    assert out.mode == mode and out.size == img.size
    before, after = np.asarray(img).astype(int), np.asarray(out).astype(int)
    if op == "grayscale" and mode == "L":
        assert np.array_equal(after, before)  # already grey: nothing to do
        return
    assert np.abs(after - before).mean() > 1.0
    if mode == "RGB" and op in ("grayscale", "sobel", "canny"):
        assert np.array_equal(after[..., 0], after[..., 1]) and np.array_equal(after[..., 1], after[..., 2])
    if op == "canny":
        assert set(np.unique(after).tolist()) == {0, 255}
    if op in ("equalize", "sobel"):
        assert after.max() == 255


def test_ops_on_a_flat_image() -> None:
    flat = Image.new("L", (32, 32), 100)
    assert np.asarray(apply_ops(flat, ["sobel"])).max() == 0
    assert np.asarray(apply_ops(flat, ["canny"])).max() == 0
    assert np.asarray(apply_ops(flat, ["median:5", "gaussian:2"])).tolist() == np.asarray(flat).tolist()


def test_parse_op_arguments() -> None:
    assert parse_op("median:5")[1] == (5.0,)
    assert parse_op(" Canny:50 ")[1] == (50.0, 200.0)
    assert parse_op("equalize")[1] == ()
    with pytest.raises(ImageRecError, match="at most 0 argument"):
        parse_op("equalize:3")
    with pytest.raises(ImageRecError, match="must be numbers"):
        parse_op("median:big")
    with pytest.raises(ImageRecError, match="unknown preprocessing op 'medain'.*Did you mean 'median'"):
        parse_op("medain:3")
    with pytest.raises(ImageRecError) as e:
        parse_op("blur")
    assert "use one of median, gaussian" in str(e.value)


@pytest.mark.parametrize(("spec", "message"), [
    ("median:4", "odd whole number from 3"),  # once silently run as median:5
    ("median:0", "odd whole number from 3"),
    ("median:-3", "odd whole number from 3"),
    ("median:3.5", "odd whole number from 3"),
    ("gaussian:0", "sigma must be > 0"),
    ("gaussian:-1", "sigma must be > 0"),
    ("gaussian:nan", "finite"),
    ("gaussian:inf", "finite"),
    ("clahe:-2", "clip limit must be > 0"),
    ("clahe:0", "clip limit must be > 0"),
    ("canny:200:100", "0 <= low < high"),
    ("canny:-5", "0 <= low < high"),
    ("canny:300", "0 <= low < high"),  # low 300 above the default high 200
])
def test_parse_op_refuses_out_of_range_arguments(spec: str, message: str) -> None:
    with pytest.raises(ImageRecError, match=rf"op '{re.escape(spec)}': .*{re.escape(message)}"):
        parse_op(spec)


def test_parse_op_accepts_in_range_arguments_and_applies_them_unchanged() -> None:
    for spec in ("median:3", "median:7", "gaussian:0.5", "clahe:2", "canny:0:1", "canny:50:150"):
        parse_op(spec)
    digit = Image.fromarray(read_data("mnist-mini").arrays["test"][0])
    assert np.array_equal(np.asarray(apply_ops(digit, ["median:5"])), np.asarray(digit.filter(ImageFilter.MedianFilter(5))))


# --- BatchAugment ------------------------------------------------------------------------------------


def batch(n: int = 16, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_geometric_keeps_shape_dtype_and_is_seeded() -> None:
    aug = BatchAugment(cfg(32), "standard", hflip=None, mixup=0, cutmix=0)
    assert aug.pad == 4 and aug.flip
    x = batch()
    torch.manual_seed(0)
    a = aug.geometric(x)
    torch.manual_seed(0)
    b = aug.geometric(x)
    torch.manual_seed(1)
    c = aug.geometric(x)
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_geometric_is_a_shift_of_the_padded_sample_maybe_flipped() -> None:
    aug = BatchAugment(cfg(32), "standard", hflip=None, mixup=0, cutmix=0)
    x = batch(8)
    torch.manual_seed(2)
    out = aug.geometric(x)
    padded = torch.nn.functional.pad(x.float(), (4, 4, 4, 4), mode="replicate").to(torch.uint8)
    shifts = set()
    for i in range(len(x)):
        windows = {(dy, dx): padded[i, :, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)}
        matches = [(dy, dx, flip) for (dy, dx), w in windows.items() for flip in (False, True)
                   if torch.equal(out[i], w.flip(-1) if flip else w)]
        assert matches, f"sample {i} is not a shifted crop of its own padded input"
        shifts.add(matches[0])
    assert len(shifts) > 1  # each sample gets its own draw


def test_cutout_blanks_one_square_per_sample_with_the_mean_colour() -> None:
    pre = PreprocessConfig(32, 3, (0.25, 0.5, 1.0), (0.5,) * 3, 32, ("a", "b"))
    aug = BatchAugment(pre, "none", hflip=False, mixup=0, cutmix=0, cutout=12)
    x = torch.full((64, 3, 32, 32), 7, dtype=torch.uint8)  # no pixel equals any channel's fill
    torch.manual_seed(0)
    out = aug.geometric(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    corners = set()
    for i in range(len(x)):
        cut = out[i] != 7  # (C, H, W)
        assert torch.equal(cut[0], cut[1]) and torch.equal(cut[0], cut[2])  # the same square in every channel
        rows, cols = cut[0].nonzero(as_tuple=True)
        assert len(rows) == 12 * 12, f"sample {i}: {len(rows)} pixels cut, not one 12x12 square inside the image"
        top, left = int(rows.min()), int(cols.min())
        assert int(rows.max()) - top == 11 and int(cols.max()) - left == 11
        assert out[i, :, top, left].tolist() == [64, 128, 255]  # the mean colour, as airbench's normalised 0
        corners.add((top, left))
    assert len(corners) > 20  # each sample draws its own square
    off = BatchAugment(pre, "none", hflip=False, mixup=0, cutmix=0)
    assert torch.equal(off.geometric(x), x)


def test_cutout_out_of_range_is_a_clear_error() -> None:
    from imagerec.config import TrainConfig

    with pytest.raises(ImageRecError, match="cutout .* got -3"):
        TrainConfig(data="x", out="y", cutout=-3).validate()


def test_flip_only_mirrors_some_rows() -> None:
    aug = BatchAugment(cfg(96, 110), "none", hflip=True, mixup=0, cutmix=0)
    assert aug.pad == 0
    x = batch(32, 16)
    torch.manual_seed(0)
    out = aug.geometric(x)
    flipped = [bool(torch.equal(o, xi.flip(-1))) for o, xi in zip(out, x, strict=True)]
    kept = [bool(torch.equal(o, xi)) for o, xi in zip(out, x, strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))  # every row is one or the other
    assert 0 < sum(flipped) < len(x)


def test_no_augmentation_preset_is_identity() -> None:
    aug = BatchAugment(cfg(96, 110), "none", hflip=None, mixup=0, cutmix=0)
    x = batch(4, 16)
    assert torch.equal(aug.geometric(x), x)
    y = torch.tensor([0, 1, 0, 1])
    xf = x.float()
    xo, yo = aug.after_normalize(xf, y)
    assert torch.equal(xo, xf) and torch.equal(yo, y)


def test_extreme_aspect_ratio_is_cropped_before_the_resize() -> None:
    """A 1 x 1,600,000 strip (a 2 KB PNG under any pixel limit) resized short side first would be
    256 x 409,600,000 pixels; the base transform keeps only what the centre crop needs."""
    pre = cfg(224, 256)
    strip = Image.new("RGB", (1_600_000, 1), (128, 10, 200))
    x = base_transform(pre)(strip)
    assert x.shape == (3, 224, 224) and x[:, 0, 0].tolist() == [128, 10, 200]
    # long images with content: the pixels of resizing the whole of it then cropping, to within
    # PIL's rounding (1 level of 255); images of ordinary shape take exactly the usual path
    rng = np.random.default_rng(0)
    for shape in ((50, 3000, 3), (3000, 40, 3), (37, 5001, 3), (300, 1000, 3)):
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), "RGB")
        whole = F.pil_to_tensor(F.center_crop(F.resize(img, [256], antialias=True), [224, 224]))
        diff = (base_transform(pre)(img).int() - whole.int()).abs()
        assert diff.max() <= (1 if max(shape) / min(shape[:2]) > 4 else 0), shape


# --- mixup / cutmix ---------------------------------------------------------------------------------


def test_explicit_zero_turns_strongs_mixing_off_and_unset_keeps_it() -> None:
    """`--augment strong --mixup 0 --cutmix 0`: no mixing (0 = off, as --help says); unset (None): strong's own."""
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 2
    off = BatchAugment(cfg(32), "strong", hflip=None, mixup=0.0, cutmix=0.0)
    assert off.mix is None
    torch.manual_seed(0)
    _, y_off = off.after_normalize(x, y)
    assert torch.equal(y_off, y)  # hard labels: nothing was mixed
    preset = BatchAugment(cfg(32), "strong", hflip=None, mixup=None, cutmix=None)
    assert [(type(m).__name__, m.alpha) for m in preset.mix.transforms] == [("MixUp", 0.2), ("CutMix", 1.0)]
    only_cutmix = BatchAugment(cfg(32), "strong", hflip=None, mixup=0.0, cutmix=None)
    assert [type(m).__name__ for m in only_cutmix.mix.transforms] == ["CutMix"]
    assert BatchAugment(cfg(32), "light", hflip=None).mix is None  # other presets: off unless given
    assert resolve_mixing("strong", None, 0.0) == (0.2, 0.0) and resolve_mixing("light", 0.3, None) == (0.3, 0.0)


def test_legacy_checkpoints_resume_with_the_mixing_they_trained_with() -> None:
    """Checkpoints written before an explicit 0 meant off (no `batch_mixing`) took 0 as unset with
    strong and never mixed multi-label data: their resume keeps doing what they did."""
    old = {"preprocess": {"multi_label": False}}
    strong = TrainConfig(augment="strong", mixup=0.0, cutmix=0.5)
    assert legacy_mixing(strong, old) == {"mixup": 0.2, "cutmix": 0.5}
    assert legacy_mixing(TrainConfig(augment="light", mixup=0.4, cutmix=0.0), old) == {"mixup": 0.4, "cutmix": 0.0}
    assert legacy_mixing(strong, {"preprocess": {"multi_label": True}}) == {"mixup": 0.0, "cutmix": 0.0}
    assert legacy_mixing(strong, {**old, "batch_mixing": {"mixup": 0.0, "cutmix": 0.5}}) == {}  # a newer checkpoint
    assert TrainConfig().mixup is None and TrainConfig().cutmix is None  # a config file without them: the preset's


def multi_hot(n: int = 8, k: int = 5) -> torch.Tensor:
    return (torch.rand(n, k, generator=torch.Generator().manual_seed(1)) < 0.4).float()


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_multi_label_batches_are_mixed_with_their_label_sets(kind: str) -> None:
    """On multi-hot targets a mixed image's targets are the same blend of both images' label sets."""
    pre = PreprocessConfig(16, 3, (0.5,) * 3, (0.5,) * 3, 16, tuple("abcde"), multi_label=True)
    aug = BatchAugment(pre, "light", hflip=None, **{kind: 1.0})
    x, y = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)), multi_hot()
    lams = []
    for seed in range(5):
        torch.manual_seed(seed)
        xm, ym = aug.after_normalize(x, y)
        other = x.roll(1, 0)
        if kind == "mixup":  # xm = lam * x + (1 - lam) * other, one lam for the batch
            lam = float(((xm - other) / (x - other))[0, 0, 0, 0])
            torch.testing.assert_close(xm, lam * x + (1 - lam) * other)
        else:  # a box of `other` pasted in: lam = the share of pixels kept
            pasted = (xm != x).any(1) & (xm == other).all(1)  # (B, H, W)
            assert torch.equal(pasted, pasted[:1].expand_as(pasted))  # the same box in every image
            assert ((xm == x).all(1) | pasted).all()
            lam = 1.0 - float(pasted[0].float().mean())
        assert 0.0 <= lam <= 1.0
        torch.testing.assert_close(ym, lam * y + (1 - lam) * y.roll(1, 0))
        lams.append(lam)
    assert ym.shape == y.shape and ym.min() >= 0 and ym.max() <= 1
    assert min(lams) < 0.95 and not torch.equal(ym, y)  # it did mix (soft targets), not pass the batch through


# --- the documented preprocessing order ---------------------------------------------------------


def test_documented_preprocess_order_is_the_order_base_transform_runs() -> None:
    """PreprocessConfig's docstring is the contract saved in every checkpoint and bundle: the ops
    run on the resized, centre-cropped pixels, not before the resize."""
    pre = cfg(16, 24, ops=("equalize",))
    img = scene("RGB")  # 48x48: resized to 24, cropped to 16
    documented = apply_ops(F.center_crop(F.resize(img, [24], antialias=True), [16, 16]), ["equalize"])
    before = F.center_crop(F.resize(apply_ops(img, ["equalize"]), [24], antialias=True), [16, 16])
    out = base_transform(pre)(img)
    assert torch.equal(out, F.pil_to_tensor(documented)) and not torch.equal(out, F.pil_to_tensor(before))
    doc = " ".join((PreprocessConfig.__doc__ or "").split())
    assert doc.index("EXIF") < doc.index("resize shorter side") < doc.index("center crop") < doc.index("`ops`")


def test_long_image_shortcut_is_documented_as_it_behaves() -> None:
    """The one-step resize+crop of images over 4:1 matches the two steps to within 1 level for
    bilinear (the default); bicubic can differ more (PIL's pass order): the docstring says so, and
    no longer claims equality."""
    from imagerec.transforms import _resize_crop_of_long_image

    doc = " ".join((_resize_crop_of_long_image.__doc__ or "").split())
    assert "equals the two steps" not in doc and "bilinear (the default) is within 1 level" in doc
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (2001, 97, 3), dtype=np.uint8), "RGB")  # tall and noisy
    two = F.pil_to_tensor(F.center_crop(F.resize(img, [256], antialias=True), [224, 224]))
    assert (base_transform(cfg(224, 256))(img).int() - two.int()).abs().max() <= 1
