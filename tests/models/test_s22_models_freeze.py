"""--freeze-backbone: the frozen backbone is a fixed feature extractor, its dropout off in training too."""

from __future__ import annotations

import torch
from timm.layers import DropPath

from imagerec.models import create_model, create_param_groups
from imagerec.models.pretrained import set_frozen_norms_eval


def test_frozen_backbone_dropout_is_off_in_training() -> None:
    """mlp's Dropout sits in its backbone: active, the head trained on features eval never gives it."""
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=3, in_chans=1, img_size=8, drop_rate=0.5)
    create_param_groups(model, lr=1e-3, weight_decay=0.0, freeze_backbone=True)
    model.train()
    set_frozen_norms_eval(model)
    x = torch.randn(4, 1, 8, 8)
    a, b = model.forward_features(x), model.forward_features(x)
    assert torch.equal(a, b)
    assert torch.equal(a, model.eval().forward_features(x))
    assert model.train().get_classifier().training


def test_frozen_rnn_and_timm_drop_layers_off_head_drop_kept() -> None:
    rnn = create_model("rnn", num_classes=2, in_chans=1, img_size=8, drop_rate=0.5, hidden_size=8).train()
    set_frozen_norms_eval(rnn)
    assert not rnn.rnn.training  # the LSTM's inter-layer dropout
    vit = create_model("timm/vit_tiny_patch16_224", num_classes=2, img_size=32, depth=1,
                       drop_rate=0.1, drop_path_rate=0.1, proj_drop_rate=0.1).train()
    set_frozen_norms_eval(vit)
    drops = {n: m.training for n, m in vit.named_modules() if isinstance(m, (torch.nn.Dropout, DropPath))}
    assert drops.pop("head_drop") is True  # the head's own dropout regularises the head being trained
    assert drops and not any(drops.values())
