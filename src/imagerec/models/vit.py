"""`vit-tiny`: timm's VisionTransformer at ViT-Ti/16 width, with small patches for small images."""

from __future__ import annotations

from typing import Any

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from imagerec.models._registry import register_model
from imagerec.models.timm_models import check_patch_multiple


@register_model("vit-tiny")
def vit_tiny(num_classes: int, in_chans: int = 3, img_size: int = 224, **kwargs: Any) -> nn.Module:
    """Vision Transformer, tiny (192 wide, 12 deep); 4px patches for images <= 64px."""
    # 16px patches on a 32px image leave 4 tokens; 4px patches keep an 8x8 grid as at 224/16 ~ 14x14.
    # Caller kwargs override the defaults (e.g. depth=1 for a quick test).
    def patch_for(size: int) -> int:
        return kwargs.get("patch_size", 4 if size <= 64 else 16)

    check_patch_multiple("vit-tiny", img_size, patch_for)
    cfg = {"embed_dim": 192, "depth": 12, "num_heads": 3, "patch_size": patch_for(img_size), **kwargs}
    return VisionTransformer(img_size=img_size, in_chans=in_chans, num_classes=num_classes, **cfg)
