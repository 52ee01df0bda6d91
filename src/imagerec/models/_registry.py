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
    """Build a classifier by name.

    Example:
        >>> model = create_model("cnn", num_classes=10, in_chans=1, img_size=28)
    """
    if name.startswith("timm/"):
        from imagerec.models.timm_models import create_timm_model

        return create_timm_model(name[len("timm/"):], num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
    if name not in _MODELS:
        raise ImageRecError(
            f"unknown model '{name}'.{did_you_mean(name, _MODELS)} "
            f"Run 'imagerec models' to list them, or use timm/<name> for any timm architecture."
        )
    return _MODELS[name](num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
