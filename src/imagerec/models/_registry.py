"""The model registry: `register_model` on small entrypoint functions, `create_model`, `list_models`.

Modeled on timm's `_registry.py`/`_factory.py`. Names in the registry are plain (`cnn`,
`resnet18`); any timm architecture is reachable as `timm/<name>` without registering it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from torch import nn

from imagerec.utils import ImageRecError, did_you_mean

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register an entrypoint `fn(num_classes, in_chans, img_size, **kw) -> nn.Module`."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model '{name}' is registered twice")
        _MODELS[name] = fn
        _DESCRIPTIONS[name] = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        return fn

    return wrap


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, e.g. `list_models("res*")`."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def describe_model(name: str) -> str:
    return _DESCRIPTIONS.get(name, "")


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    img_size: int = 224,
    **kwargs: Any,
) -> nn.Module:
    """Build a classifier by name; `pretrained` is False (random init), or weights to start from: a
    .safetensors file, an imagerec run directory or `hf-hub:ORG/NAME` (`load_pretrained`: the
    classifier stays as built, an input conv is adapted to `in_chans`). imagerec ships no weights of
    its own, so `pretrained=True` is refused with what to pass instead.

    Example:
        >>> model = create_model("cnn", num_classes=10, in_chans=1, img_size=28)
        >>> tuned = create_model("cnn", num_classes=3, in_chans=1, img_size=28, pretrained="runs/mnist")
    """
    pretrained = kwargs.pop("pretrained", False)
    if pretrained is True:
        hint = f"'hf-hub:timm/{name[len('timm/'):]}', " if name.startswith("timm/") else ""
        raise ImageRecError(f"{name} is built without weights (imagerec downloads none by itself): pass "
                            f"pretrained={hint}a .safetensors file or a run directory to start from")
    if name.startswith("timm/"):
        from imagerec.models.timm_models import create_timm_model

        model = create_timm_model(name[len("timm/"):], num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
    elif name not in _MODELS:
        raise ImageRecError(
            f"unknown model '{name}'.{did_you_mean(name, _MODELS)} "
            f"Run 'imagerec models' to list them, or use timm/<name> for any timm architecture."
        )
    else:
        model = _MODELS[name](num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
    if pretrained:
        from imagerec.models.pretrained import load_pretrained

        load_pretrained(model, str(pretrained))
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
