"""Optimizers and learning-rate schedules.

A schedule is a pure function of the global step, so resuming needs no scheduler state.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from imagerec.config import TrainConfig
from imagerec.models import create_param_groups

DEFAULT_LR = {"sgd": 0.02, "adam": 1e-3, "adamw": 3e-3, "adagrad": 1e-2}
DEFAULT_WD = {"sgd": 5e-4, "adam": 0.0, "adamw": 0.05, "adagrad": 0.0}


def resolve_lr_wd(cfg: TrainConfig) -> tuple[float, float]:
    """(lr, weight decay): the config's, or the optimizer's defaults where it leaves them unset."""
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.optimizer]
    wd = cfg.weight_decay if cfg.weight_decay is not None else DEFAULT_WD[cfg.optimizer]
    return lr, wd


def create_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    lr, wd = resolve_lr_wd(cfg)
    groups = create_param_groups(model, lr, wd, cfg.backbone_lr_scale, cfg.freeze_backbone)
    if cfg.norm_lr_scale != 1.0:
        groups = split_norm_groups(model, groups, cfg.norm_lr_scale)
    # foreach kernels batch the per-parameter updates; fused is faster still where supported (CUDA).
    fast = {"fused": True} if device.type == "cuda" and cfg.optimizer in ("adam", "adamw", "sgd") else {"foreach": True}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, **fast)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, **fast)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **fast)
    return torch.optim.Adagrad(groups, lr=lr, foreach=True)


def split_norm_groups(model: torch.nn.Module, groups: list[dict], scale: float) -> list[dict]:
    """Give normalisation-layer parameters their own groups with lr * scale and weight decay / scale,
    so their (coupled) decay per step is unchanged: airbench trains BN shifts 64x faster."""
    norm_ids = {id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)}
    out = []
    for g in groups:
        plain = [p for p in g["params"] if id(p) not in norm_ids]
        norm = [p for p in g["params"] if id(p) in norm_ids]
        if plain:
            out.append({**g, "params": plain})
        if norm:
            out.append({**g, "name": f"{g.get('name', 'group')}_norm", "params": norm, "lr": g["lr"] * scale, "weight_decay": g.get("weight_decay", 0.0) / scale})
    return out


_NORMS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)


def create_schedule(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """step -> multiplier of each group's base lr.

    `cfg.warmup_epochs` is the warm-up of every schedule; None (the default) leaves each its own:
    onecycle 25% of the steps, triangle 23%, cosine and constant one epoch."""
    total = max(1, cfg.epochs * steps_per_epoch)
    explicit_warm = None if cfg.warmup_epochs is None else min(total, int(cfg.warmup_epochs * steps_per_epoch))
    if cfg.schedule == "onecycle":
        # fastai/timm one-cycle: warm-up from lr/25 (pct_start 25% by default), then cosine down to ~0.
        warm = max(1, int(0.25 * total)) if explicit_warm is None else explicit_warm

        def onecycle(step: int) -> float:
            if step < warm:
                return 0.04 + 0.96 * step / warm
            t = min(1.0, (step - warm) / max(1, total - warm))
            return 0.5 * (1 + math.cos(math.pi * t)) * (1 - 1e-4) + 1e-4

        return onecycle
    if cfg.schedule == "triangle":
        # airbench94: linear 0.2 -> 1 over the first 23% of steps, then linear down to 0.07.
        peak = max(1, int(0.23 * total)) if explicit_warm is None else explicit_warm

        def triangle(step: int) -> float:
            if step < peak:
                return 0.2 + 0.8 * step / peak
            return 1.0 - 0.93 * min(1.0, (step - peak) / max(1, total - peak))

        return triangle
    warm = steps_per_epoch if explicit_warm is None else explicit_warm

    def warmup_then(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.schedule == "constant":
            return 1.0
        t = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * (1 + math.cos(math.pi * t))

    return warmup_then


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g.setdefault("base_lr", g["lr"])
        g["lr"] = g["base_lr"] * factor
