"""ImageLoader: bad files are skipped and reported, shuffling is seeded, resuming mid-epoch is exact."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from imagerec.config import PreprocessConfig
from imagerec.data import DataSpec, open_image, read_data
from imagerec.data.loader import ImageLoader, targets_tensor
from imagerec.transforms import base_transform

SIZE = 8
BAD = {"corrupt.png", "empty.jpg", "notes.jpg"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes of 11 good 10x10 images, each with its own colour, plus three bad files."""
    root = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir()
        for i in range(11):
            Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(root / cls / f"{i:02d}.png")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    i = data.index(b"IDAT") + 20
    data[i : i + 16] = bytes(16)
    (root / "a" / "corrupt.png").write_bytes(bytes(data))
    (root / "b" / "empty.jpg").write_bytes(b"")
    (root / "a" / "notes.jpg").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def spec(folder: Path) -> DataSpec:
    return read_data(str(folder))


def make_loader(spec: DataSpec, **kw: object) -> ImageLoader:
    cfg = PreprocessConfig(SIZE, 3, (0.5,) * 3, (0.5,) * 3, SIZE, tuple(spec.class_names))
    items = spec.splits["train"]
    args: dict = {"batch_size": 4, "workers": 0, "cache": "ram", "seed": 3} | kw
    targets = targets_tensor(items, 2, False)
    return ImageLoader(items, spec.arrays, 3, SIZE, base_transform(cfg), targets=targets, **args)


def expected_tensor(spec: DataSpec, i: int) -> torch.Tensor:
    cfg = PreprocessConfig(SIZE, 3, (0.5,) * 3, (0.5,) * 3, SIZE, tuple(spec.class_names))
    return base_transform(cfg)(open_image(spec.splits["train"][i].source))


Batches = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def collect(loader: ImageLoader, epoch: int = 0, start_step: int = 0) -> Batches:
    return [(b.x, b.y, b.index) for b in loader.epoch(epoch, start_step=start_step)]


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b, strict=True):
        assert torch.equal(ia, ib) and torch.equal(ya, yb) and torch.equal(xa, xb)


@pytest.mark.parametrize("cache", ["ram", "none"])
def test_bad_files_are_skipped_and_named(spec: DataSpec, cache: str) -> None:
    items = spec.splits["train"]
    assert len(items) == 25
    bad = {i for i, it in enumerate(items) if Path(it.source).name in BAD}  # type: ignore[arg-type]
    loader = make_loader(spec, cache=cache)
    assert (loader.cache is not None) == (cache == "ram")
    batches = collect(loader)  # no exception
    seen = torch.cat([idx for _, _, idx in batches]).tolist()
    assert sorted(seen) == [i for i in range(25) if i not in bad]
    for x, y, idx in batches:
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, SIZE, SIZE)
        assert torch.equal(y, torch.tensor([items[i].target for i in idx.tolist()]))
        for row, i in zip(x, idx.tolist(), strict=True):
            assert torch.equal(row, expected_tensor(spec, i))
    messages = list(loader.skipped.values())
    assert len(messages) == 3
    assert {name for name in BAD for m in messages if Path(m.split(":")[0]).name == name} == BAD
    collect(loader, epoch=1)
    assert len(loader.skipped) == 3  # reported once, not once per epoch


def test_shuffled_order_is_seeded_per_epoch(spec: DataSpec) -> None:
    a, b = make_loader(spec, shuffle=True), make_loader(spec, shuffle=True)
    assert np.array_equal(a.order(0), b.order(0))
    assert not np.array_equal(a.order(0), a.order(1))
    assert sorted(a.order(0).tolist()) == sorted(a.order(1).tolist()) == a.valid.tolist()
    assert not np.array_equal(a.order(0), make_loader(spec, shuffle=True, seed=4).order(0))
    assert len(a) == 22 // 4  # the ragged last batch is dropped when shuffling
    assert_same_batches(collect(a, 2), collect(b, 2))
    assert torch.equal(collect(a, 0)[0][2], torch.from_numpy(a.order(0)[:4]))


def random_crop_flip() -> v2.Compose:
    return v2.Compose([v2.RandomCrop(SIZE, padding=2), v2.RandomHorizontalFlip()])


@pytest.mark.parametrize("cache", ["ram", "none"])
@pytest.mark.parametrize("augment", [None, "crop_flip"])
def test_start_step_resumes_exactly(spec: DataSpec, cache: str, augment: str | None) -> None:
    aug = random_crop_flip() if augment else None
    loader = make_loader(spec, shuffle=True, cache=cache, augment=aug)
    full = collect(loader, epoch=1)
    assert len(full) == (22 if cache == "ram" else 25) // 4  # streaming learns of bad files only when reading
    for k in (1, 3):
        assert_same_batches(collect(loader, epoch=1, start_step=k), full[k:])
    assert collect(loader, epoch=1, start_step=len(full)) == []
    if aug is not None:
        plain = collect(make_loader(spec, shuffle=True, cache=cache), epoch=1)
        assert any(not torch.equal(f[0], p[0]) for f, p in zip(full, plain, strict=True))  # augment did something
        again = collect(make_loader(spec, shuffle=True, cache=cache, augment=random_crop_flip()), epoch=1)
        assert_same_batches(again, full)  # same (seed, epoch) -> same augmentation


def test_resume_does_not_depend_on_workers(spec: DataSpec) -> None:
    full = collect(make_loader(spec, shuffle=True, cache="none", augment=random_crop_flip()), epoch=2)
    resumed = collect(make_loader(spec, shuffle=True, cache="none", augment=random_crop_flip(), workers=2), 2, 2)
    assert_same_batches(resumed, full[2:])


@pytest.mark.parametrize("ops", [(), ("sobel",), ("median:3", "clahe")])
def test_array_cache_equals_the_eval_transform(ops: tuple[str, ...]) -> None:
    """IDX arrays are copied into the cache as they are only when the transform would leave them
    so: with preprocessing ops the cache holds what eval/predict compute for the same images."""
    from imagerec.data.loader import arrays_pass_through

    spec = read_data("mnist-mini")
    items = spec.splits["train"][:40]
    pre = PreprocessConfig(28, 1, (0.5,), (0.5,), 28, tuple(spec.class_names), ops=ops)
    t = base_transform(pre)
    assert arrays_pass_through(pre, 28) == (not ops)
    expected = torch.stack([t(open_image(it.source, 1, spec.arrays)) for it in items])
    for fast in (arrays_pass_through(pre, 28), True):  # True: the loader checks the caller's claim
        loader = ImageLoader(items, spec.arrays, 1, 28, t, 8, targets_tensor(items, 10, False), cache="ram",
                             workers=0, fast_arrays=fast)
        assert torch.equal(loader.cache, expected)
    raw = torch.from_numpy(np.stack([spec.arrays["train"][it.source.index] for it in items]))[:, None]
    assert torch.equal(expected, raw) == (not ops)  # the ops do change the images
