"""--recipe fast: settings resolution, the airbench model, lookahead, the triangle schedule."""

from __future__ import annotations

import math

import pytest
import torch

from imagerec.config import TrainConfig
from imagerec.engine.lookahead import Lookahead
from imagerec.engine.optim import create_optimizer, create_schedule
from imagerec.engine.recipes import apply_recipe
from imagerec.engine.run import train
from imagerec.models import create_model
from imagerec.utils import ImageRecError, cpu_supports_bf16


def test_recipe_fills_only_settings_left_at_their_defaults() -> None:
    cfg = apply_recipe(TrainConfig(recipe="fast", epochs=3, label_smoothing=0.05), channels=3, size=32, has_test_split=True)
    assert (cfg.model, cfg.optimizer, cfg.schedule, cfg.lookahead) == ("airbench", "sgd", "triangle", True)
    assert cfg.epochs == 3 and cfg.label_smoothing == 0.05  # the user's own values win
    assert cfg.hflip is True and cfg.translate == 2 and cfg.val_fraction == 0.0
    assert cfg.lr == pytest.approx(1.5 * cfg.batch_size / 1024)


def test_recipe_keeps_settings_the_user_gave_even_at_their_default_value(tmp_path) -> None:
    """`--recipe fast --epochs 10` trained 6 epochs: 10 is also TrainConfig's default, and the recipe
    took any default-valued field as unset."""
    from imagerec.cli import build_parser
    from imagerec.config import apply_overrides, load_config_file

    cfg = apply_overrides(TrainConfig(), {"recipe": "fast", "epochs": 10, "batch_size": 128}, "test")
    cfg = apply_recipe(cfg, channels=3, size=32, has_test_split=True)
    assert (cfg.epochs, cfg.batch_size, cfg.model) == (10, 128, "airbench")
    # A config file's keys count as given, and the flag list has no --explicit.
    path = tmp_path / "cfg.yaml"
    path.write_text("recipe: fast\nepochs: 10\n")
    assert apply_recipe(load_config_file(path), channels=3, size=32, has_test_split=True).epochs == 10
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "x", "--explicit", "epochs"])
    with pytest.raises(ImageRecError, match="unknown config key 'explicit'"):
        apply_overrides(TrainConfig(), {"explicit": ["epochs"]}, "test")
    # A run's config.yaml (to_dict) is still a valid --config file.
    import yaml

    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config_file(path).epochs == 10 and "explicit" not in cfg.to_dict()


def test_recipe_per_image_kind() -> None:
    gray = apply_recipe(TrainConfig(recipe="fast"), channels=1, size=28, has_test_split=False)
    assert gray.hflip is False and gray.epochs == 1 and gray.lr == 0.6 and gray.grad_clip == 5.0
    assert gray.val_fraction == TrainConfig().val_fraction  # no test split: keep a val split to report on
    assert apply_recipe(TrainConfig(), channels=1, size=28, has_test_split=True) == TrainConfig()


def test_unknown_recipe_is_refused() -> None:
    with pytest.raises(ImageRecError, match="unknown recipe 'fsat'.*fast"):
        TrainConfig(recipe="fsat").validate()


def test_triangle_schedule() -> None:
    f = create_schedule(TrainConfig(schedule="triangle", epochs=1), steps_per_epoch=100)
    assert f(0) == pytest.approx(0.2)
    assert f(23) == pytest.approx(1.0)
    assert f(100) == pytest.approx(0.07)
    assert all(f(k) <= f(k + 1) for k in range(23)) and all(f(k) >= f(k + 1) for k in range(23, 100))


def test_norm_shifts_get_scaled_lr_and_matching_decay() -> None:
    model = create_model("airbench", num_classes=10, in_chans=3, img_size=32)
    opt = create_optimizer(model, TrainConfig(optimizer="sgd", lr=0.5, weight_decay=0.01, norm_lr_scale=64.0), torch.device("cpu"))
    bn_biases = {id(m.bias) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    for g in opt.param_groups:
        ids = {id(p) for p in g["params"]}
        if ids & bn_biases:
            assert ids <= bn_biases and g["lr"] == pytest.approx(32.0)
            assert g["lr"] * g["weight_decay"] == pytest.approx(0.5 * (0.0 if "no_decay" in g["name"] else 0.01))
        else:
            assert g["lr"] == pytest.approx(0.5)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())


def test_lookahead_averages_and_finishes_on_the_average() -> None:
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    la = Lookahead(model)
    with torch.no_grad():
        model.weight.fill_(1.0)
    la.step(5, total=10)  # decay 0.95**5 * 0.5**3
    d = 0.95**5 * 0.125
    assert torch.allclose(model.weight, torch.full((1, 2), 1 - d))
    with torch.no_grad():
        model.weight.fill_(3.0)
    la.step(7, total=10)  # not a sync step: nothing moves
    assert torch.equal(model.weight, torch.full((1, 2), 3.0))
    slow = la.state_dict()["lookahead.weight"].clone()
    la.step(10, total=10)  # the last step: the net becomes the slow weights
    assert torch.equal(model.weight.detach(), slow)


def test_whitening_stem_whitens_patches() -> None:
    torch.manual_seed(0)
    base = torch.randn(256, 3, 16, 16)
    x = base + 0.8 * base.roll(1, dims=1) + 0.5 * base.roll(1, dims=3)  # correlated channels and pixels
    model = create_model("airbench", num_classes=10, in_chans=3, img_size=16)
    model.init_from_data(x)
    out = torch.nn.functional.conv2d(x, model.whiten.weight[:12])  # the positive half: (B, 12, 15, 15)
    flat = out.transpose(0, 1).reshape(12, -1)
    cov = flat @ flat.T / flat.shape[1]
    assert torch.allclose(cov, torch.eye(12), atol=0.05)


def test_tta_views() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    flip = create_model("airbench", num_classes=10, in_chans=3, img_size=32, tta="flip").eval()
    assert torch.allclose(flip(x), flip(x.flip(-1)), atol=1e-5)  # mirror-averaged logits are mirror-invariant
    both = create_model("airbench", num_classes=10, in_chans=3, img_size=32, tta="flip-translate").eval()
    both.load_state_dict(flip.state_dict())
    plain = lambda v: both.forward_head(both._features(v))  # noqa: E731
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    views = [padded[..., :32, :32], padded[..., 2:, 2:]]
    expect = 0.25 * (plain(x) + plain(x.flip(-1))) + 0.125 * sum(plain(v) + plain(v.flip(-1)) for v in views)
    assert torch.allclose(both(x), expect, atol=1e-5)
    assert create_model("airbench", num_classes=10, in_chans=1, img_size=28).tta == "translate"  # digits are never mirrored


@pytest.mark.parametrize("precision", [
    "fp32",
    pytest.param("bf16", marks=pytest.mark.skipif(not cpu_supports_bf16(), reason="no native bf16 on this CPU")),
])
def test_fast_recipe_trains_mnist_mini(tmp_path, precision: str) -> None:
    # bf16: without the recipe's gradient clip this run diverged to NaN in epoch 1 (seed 0).
    r = train(data="mnist-mini", out=str(tmp_path / "run"), recipe="fast", epochs=3, precision=precision, seed=0)
    assert r.model_name == "airbench"
    assert r.metrics["test"]["accuracy"] >= 0.95
    assert math.isfinite(r.metrics["test"]["loss"])
