"""Every registered model (plus one timm/ model): shapes, gradients, head reset, forward parity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from imagerec.models import count_parameters, create_model, describe_model, list_models
from imagerec.utils import ImageRecError

TIMM_MODEL = "timm/resnet10t"
ALL_MODELS = [*list_models(), TIMM_MODEL]
RESNETS = {"resnet18", "resnet50", TIMM_MODEL}
BATCH = 2

SHAPES = [(m, c, s) for m in ALL_MODELS for c, s in [(1, 28), (3, 32)]] + [(m, 3, 64) for m in sorted(RESNETS)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_registry_lists_the_builtin_models() -> None:
    expected = {"mlp", "cnn", "cnn-large", "rnn", "rnn-gru", "vit-tiny", "resnet18", "resnet50"}
    assert expected <= set(list_models())
    assert list_models("res*") == ["resnet18", "resnet50"]


@pytest.mark.parametrize("name,in_chans,size", SHAPES)
def test_forward_shape(name: str, in_chans: int, size: int) -> None:
    model = create_model(name, num_classes=5, in_chans=in_chans, img_size=size)
    out = model(torch.randn(BATCH, in_chans, size, size))
    assert out.shape == (BATCH, 5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_trainable_parameter_gets_a_gradient(name: str) -> None:
    model = create_model(name, num_classes=4, in_chans=1, img_size=28)
    model.train()
    x, y = torch.randn(BATCH + 2, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    # ResNets zero-init the last norm of each block, which blocks gradient to the convs before it
    # on the very first step; one SGD step wakes them, and the second backward must reach everything.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert dead == []


@pytest.mark.parametrize("name", ALL_MODELS)
def test_reset_classifier(name: str) -> None:
    model = create_model(name, num_classes=10, in_chans=3, img_size=32)
    model.reset_classifier(7)
    assert model(torch.randn(BATCH, 3, 32, 32)).shape == (BATCH, 7)
    assert isinstance(model.get_classifier(), nn.Linear)
    assert model.get_classifier().out_features == 7


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_is_head_of_features(name: str) -> None:
    model = create_model(name, num_classes=3, in_chans=3, img_size=32).eval()
    x = torch.randn(BATCH, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        split = model.forward_head(model.forward_features(x))
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
    assert torch.allclose(full, split, atol=1e-6)
    assert pre.shape == (BATCH, model.num_features)
    with torch.no_grad():
        feats = model.forward_features(x)
        if feats.ndim == 2:  # pooled already (timm-style nets pool in forward_head): the classifier alone is the head
            assert torch.allclose(full, model.get_classifier()(feats), atol=1e-6), name
        model.reset_classifier(0)  # no classifier: the pre-logits features (airbench scaled them by 1/9)
        assert torch.allclose(model(x), model.forward_head(model.forward_features(x), pre_logits=True), atol=1e-6), name


def test_a_timm_model_too_deep_for_the_image_size_is_named_at_creation() -> None:
    """QA: timm/convnext_atto on 28 px digits failed at the first training step with a conv2d traceback."""
    with pytest.raises(ImageRecError, match=r"timm/convnext_atto cannot take 1x28x28 images .*--image-size"):
        create_model("timm/convnext_atto", num_classes=10, in_chans=1, img_size=28)
    model = create_model("timm/convnext_atto", num_classes=10, in_chans=1, img_size=64)
    assert model.training  # the probe left the mode as built


@pytest.mark.parametrize("name", ALL_MODELS)
def test_parameter_count_and_description(name: str) -> None:
    model = create_model(name, num_classes=10, in_chans=1, img_size=28)
    n = count_parameters(model)
    assert n == sum(p.numel() for p in model.parameters()) and n > 1000
    if not name.startswith("timm/"):
        assert len(describe_model(name)) > 10


def test_unknown_model_suggests_a_close_name() -> None:
    with pytest.raises(ImageRecError, match="Did you mean 'resnet18'"):
        create_model("resnet-18", num_classes=10)


def test_unknown_timm_model_suggests_a_close_name() -> None:
    with pytest.raises(ImageRecError, match="Did you mean 'resnet10t'"):
        create_model("timm/resnet10tt", num_classes=10)


def test_timm_model_gets_img_size_when_it_takes_one() -> None:
    model = create_model("timm/vit_tiny_patch16_224", num_classes=3, img_size=32, depth=1)
    assert tuple(model.patch_embed.img_size) == (32, 32)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_timm_model_refuses_to_download_weights() -> None:
    with pytest.raises(ImageRecError, match="hf-hub:timm/resnet10t"):
        create_model(TIMM_MODEL, num_classes=3, pretrained=True)


def test_resnet_stem_depends_on_image_size() -> None:
    small = create_model("resnet18", num_classes=3, in_chans=1, img_size=32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and small.conv1.in_channels == 1
    assert isinstance(small.maxpool, nn.Identity)
    big = create_model("resnet18", num_classes=3, img_size=224)
    assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, nn.MaxPool2d)


def test_vit_patch_size_depends_on_image_size() -> None:
    assert create_model("vit-tiny", num_classes=3, img_size=32).patch_embed.patch_size == (4, 4)
    assert create_model("vit-tiny", num_classes=3, img_size=96, depth=1).patch_embed.patch_size == (16, 16)


def test_cnn_widths_kwarg() -> None:
    model = create_model("cnn", num_classes=3, in_chans=1, img_size=28, widths=(8, 16))
    assert model.num_features == 16
    assert model(torch.randn(BATCH, 1, 28, 28)).shape == (BATCH, 3)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16] and all(c.bias is None for c in convs)


def test_cnn_large_has_residual_convs_per_stage() -> None:
    model = create_model("cnn-large", num_classes=3)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 64, 128, 128, 256, 256]


@pytest.mark.parametrize("name", ["rnn", "rnn-gru"])
def test_rnn_takes_any_height_and_width(name: str) -> None:
    model = create_model(name, num_classes=3, in_chans=1, img_size=28).eval()
    assert isinstance(model.rnn, nn.GRU if name == "rnn-gru" else nn.LSTM)
    for h, w in [(28, 28), (20, 36), (40, 12)]:
        assert model(torch.randn(BATCH, 1, h, w)).shape == (BATCH, 3)


def test_rnn_unknown_cell() -> None:
    with pytest.raises(ImageRecError, match="unknown rnn cell 'transformer'"):
        create_model("rnn", num_classes=3, cell="transformer")


def test_mlp_wrong_input_size_says_what_it_expected() -> None:
    model = create_model("mlp", num_classes=3, in_chans=1, img_size=28)
    with pytest.raises(ImageRecError, match="1x28x28"):
        model(torch.randn(BATCH, 3, 32, 32))


@pytest.mark.parametrize("in_chans,smallest", [(1, 16), (3, 9)])
def test_airbench_names_the_smallest_input_it_takes(in_chans: int, smallest: int) -> None:
    """Below it the stem and three poolings leave an empty map: refused when the model is built,
    not with a raw RuntimeError in the middle of training."""
    model = create_model("airbench", num_classes=10, in_chans=in_chans, img_size=smallest)
    for mode in (model.train, model.eval):
        mode()
        assert model(torch.randn(BATCH, in_chans, smallest, smallest)).shape == (BATCH, 10)
    with pytest.raises(ImageRecError, match=f"at least {smallest} px.*--image-size {smallest}"):
        create_model("airbench", num_classes=10, in_chans=in_chans, img_size=smallest - 1)
