"""load_pretrained (safetensors only), classifier_parameter_names and create_param_groups."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from imagerec.models import classifier_parameter_names, create_model, create_param_groups, load_pretrained
from imagerec.utils import ImageRecError


def _trained_ish(name: str = "cnn", **kw: object) -> nn.Module:
    """A model whose weights and BN statistics differ from a fresh init."""
    torch.manual_seed(1)
    model = create_model(name, **{"num_classes": 10, "in_chans": 3, "img_size": 32, **kw})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 32, 32))  # moves the BatchNorm running stats
    return model


def _save_run(model: nn.Module, path: Path) -> Path:
    """Write tensors as an imagerec checkpoint does: `model.`-prefixed, next to optimizer state."""
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors["optim.state.0.exp_avg"] = torch.zeros(3)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def test_classifier_parameter_names() -> None:
    assert classifier_parameter_names(create_model("cnn", num_classes=3)) == {"head.weight", "head.bias"}
    assert classifier_parameter_names(create_model("resnet18", num_classes=3, img_size=32)) == {"fc.weight", "fc.bias"}


def test_load_from_run_dir_keeps_backbone_and_new_head(tmp_path: Path) -> None:
    src = _trained_ish()
    _save_run(src, tmp_path / "run" / "best.safetensors")
    dst = create_model("cnn", num_classes=5, in_chans=3, img_size=32)
    report = load_pretrained(dst, str(tmp_path / "run"))

    src_state, dst_state = src.state_dict(), dst.state_dict()
    backbone = [k for k in src_state if not k.startswith("head.")]
    assert report["loaded"] == len(backbone)
    assert report["skipped"] == ["head.bias", "head.weight"]
    assert report["missing"] == ["head.bias", "head.weight"]
    for k in backbone:
        assert torch.equal(src_state[k], dst_state[k]), k
    assert dst.head.weight.shape == (5, 128)
    assert dst(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_run_dir_falls_back_to_last(tmp_path: Path) -> None:
    src = _trained_ish()
    _save_run(src, tmp_path / "last.safetensors")
    dst = create_model("cnn", num_classes=10, in_chans=3, img_size=32)
    load_pretrained(dst, str(tmp_path))
    assert torch.equal(dst.stem[0].weight, src.stem[0].weight)


def test_run_dir_without_weights(tmp_path: Path) -> None:
    with pytest.raises(ImageRecError, match="neither best.safetensors nor last.safetensors"):
        load_pretrained(create_model("cnn", num_classes=3), str(tmp_path))


def test_missing_file() -> None:
    with pytest.raises(ImageRecError, match="nowhere.safetensors' not found"):
        load_pretrained(create_model("cnn", num_classes=3), "/nowhere.safetensors")


def test_shape_mismatch_is_skipped(tmp_path: Path) -> None:
    src = _trained_ish("cnn", widths=(32, 64, 96))
    path = _save_run(src, tmp_path / "w.safetensors")
    dst = create_model("cnn", num_classes=10, in_chans=3, img_size=32)
    report = load_pretrained(dst, str(path))
    assert "stages.2.0.0.weight" in report["skipped"]
    assert "stages.2.0.0.weight" in report["missing"]
    assert torch.equal(dst.stages[1][0][0].weight, src.stages[1][0][0].weight)


def test_rgb_to_grey_and_back_adapts_input_conv(tmp_path: Path) -> None:
    rgb = _trained_ish()
    path = _save_run(rgb, tmp_path / "rgb.safetensors")
    grey = create_model("cnn", num_classes=10, in_chans=1, img_size=32)
    report = load_pretrained(grey, str(path))
    assert "stem.0.weight" not in report["skipped"]
    assert torch.allclose(grey.stem[0].weight, rgb.stem[0].weight.sum(dim=1, keepdim=True))
    # A grey image through the adapted conv gives what the RGB conv gives for R = G = B.
    x = torch.randn(1, 1, 8, 8)
    assert torch.allclose(grey.stem[0](x), rgb.stem[0](x.expand(1, 3, 8, 8)), atol=1e-5)

    path1 = _save_run(grey, tmp_path / "grey.safetensors")
    rgb2 = create_model("cnn", num_classes=10, in_chans=3, img_size=32)
    load_pretrained(rgb2, str(path1))
    assert torch.allclose(rgb2.stem[0].weight, grey.stem[0].weight.repeat(1, 3, 1, 1) / 3)


def test_plain_timm_state_dict_loads(tmp_path: Path) -> None:
    # HF/timm model.safetensors files hold an unprefixed state dict.
    torch.manual_seed(0)
    src = create_model("timm/resnet10t", num_classes=1000)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "model.safetensors"))
    dst = create_model("timm/resnet10t", num_classes=3, in_chans=1)
    report = load_pretrained(dst, str(tmp_path / "model.safetensors"))
    assert report["skipped"] == ["fc.bias", "fc.weight"]
    first = "conv1.0.weight"
    assert torch.allclose(dst.state_dict()[first], src.state_dict()[first].sum(1, keepdim=True))
    assert torch.equal(dst.layer4[0].conv1.weight, src.layer4[0].conv1.weight)


def test_nothing_matching_raises(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"model.encoder.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(ImageRecError, match=r"other\.safetensors.*ConvNet"):
        load_pretrained(create_model("cnn", num_classes=3), str(path))


def test_pickle_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"stem.0.weight": torch.zeros(1)}, path)
    with pytest.raises(ImageRecError, match="not a readable safetensors file"):
        load_pretrained(create_model("cnn", num_classes=3), str(path))


def test_hf_hub_offline_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(**kwargs: object) -> str:
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ImageRecError, match=r"'timm/resnet18\.a1_in1k'.*no network.*local \.safetensors path"):
        load_pretrained(create_model("resnet18", num_classes=3), "hf-hub:timm/resnet18.a1_in1k")


def test_hf_hub_downloads_model_safetensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _trained_ish()
    _save_run(src, tmp_path / "model.safetensors")
    calls: list[dict[str, object]] = []

    def fake_download(**kwargs: object) -> str:
        calls.append(kwargs)
        return str(tmp_path / "model.safetensors")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    dst = create_model("cnn", num_classes=10, in_chans=3, img_size=32)
    load_pretrained(dst, "hf-hub:me/cnn-cifar")
    assert calls == [{"repo_id": "me/cnn-cifar", "filename": "model.safetensors"}]
    assert torch.equal(dst.stem[0].weight, src.stem[0].weight)


def test_freeze_backbone_leaves_only_head_trainable() -> None:
    model = create_model("resnet18", num_classes=4, img_size=32)
    groups = create_param_groups(model, lr=0.1, weight_decay=1e-4, freeze_backbone=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    assert [g["name"] for g in groups] == ["head_decay", "head_no_decay"]
    assert sum(len(g["params"]) for g in groups) == 2


def test_param_groups_decay_and_lr() -> None:
    model = create_model("cnn", num_classes=4)
    groups = {g["name"]: g for g in create_param_groups(model, lr=0.1, weight_decay=0.05, backbone_lr_scale=0.1)}
    assert set(groups) == {"backbone_decay", "backbone_no_decay", "head_decay", "head_no_decay"}
    assert groups["backbone_decay"]["lr"] == pytest.approx(0.01)
    assert groups["backbone_no_decay"]["lr"] == pytest.approx(0.01)
    assert groups["head_decay"]["lr"] == 0.1 and groups["head_no_decay"]["lr"] == 0.1
    assert groups["backbone_decay"]["weight_decay"] == 0.05 and groups["backbone_no_decay"]["weight_decay"] == 0.0
    assert groups["head_no_decay"]["weight_decay"] == 0.0

    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    params = dict(model.named_parameters())
    assert id(params["stem.1.weight"]) in ids["backbone_no_decay"]  # BatchNorm weight
    assert id(params["stem.0.weight"]) in ids["backbone_decay"]
    assert ids["head_decay"] == {id(params["head.weight"])}
    assert ids["head_no_decay"] == {id(params["head.bias"])}
    all_ids = [i for s in ids.values() for i in s]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())  # each param exactly once


def test_param_groups_respect_timm_no_weight_decay() -> None:
    model = create_model("vit-tiny", num_classes=4, img_size=32, depth=1)
    groups = {g["name"]: g for g in create_param_groups(model, lr=1e-3, weight_decay=0.05)}
    no_decay = {id(p) for p in groups["backbone_no_decay"]["params"]}
    assert id(model.pos_embed) in no_decay and id(model.cls_token) in no_decay


def test_param_groups_refuse_negative_scale_and_nothing_to_train() -> None:
    with pytest.raises(ImageRecError, match="backbone_lr_scale=-1"):
        create_param_groups(create_model("cnn", num_classes=3), lr=0.1, weight_decay=0.0, backbone_lr_scale=-1)
    with pytest.raises(ImageRecError, match="no trainable parameters"):
        create_param_groups(create_model("cnn", num_classes=0), lr=0.1, weight_decay=0.0, freeze_backbone=True)


def test_weights_of_another_architecture_are_refused_though_batchnorm_counters_match(tmp_path: Path) -> None:
    """QA: a cnn's weights given to cnn-large "loaded" only BatchNorm's num_batches_tracked scalars
    (they match in any model with BatchNorm) and the run trained from scratch without a word."""
    save_file(create_model("cnn", num_classes=10, in_chans=1, img_size=28).state_dict(), str(tmp_path / "cnn.safetensors"))
    target = create_model("cnn-large", num_classes=10, in_chans=1, img_size=28)
    with pytest.raises(ImageRecError, match="no weight tensor .* only BatchNorm step counters did"):
        load_pretrained(target, str(tmp_path / "cnn.safetensors"))


def test_create_model_takes_pretrained(tmp_path: Path) -> None:
    """STYLE.md's create_model(name, num_classes=..., pretrained=...): a TypeError for every registered model before."""
    source = create_model("cnn", num_classes=10, in_chans=1, img_size=28)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    plain = create_model("cnn", num_classes=3, in_chans=1, img_size=28, pretrained=False)
    tuned = create_model("cnn", num_classes=3, in_chans=1, img_size=28, pretrained=str(tmp_path / "w.safetensors"))
    backbone = [k for k in source.state_dict() if k in tuned.state_dict() and not k.startswith("head")]
    assert backbone and all(torch.equal(tuned.state_dict()[k], source.state_dict()[k]) for k in backbone)
    assert not all(torch.equal(plain.state_dict()[k], source.state_dict()[k]) for k in backbone)
    assert tuned.get_classifier().out_features == 3
    with pytest.raises(ImageRecError, match="built without weights .* pass pretrained="):
        create_model("cnn", num_classes=3, pretrained=True)
