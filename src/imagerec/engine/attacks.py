"""Untargeted L-infinity attacks (FGSM, PGD) on a classifier that takes the model's uint8 pixels.

Images are perturbed in the [0, 1] pixel range; `eps` is in those units (8/255 = 8 grey levels).
The model's own normalisation (`normalize_batch` with the config's mean/std) sits inside the
differentiable path, so gradients are taken with respect to the image, as an attacker on raw
pixels would. Everything runs in fp32, with the model in eval mode (BatchNorm statistics frozen);
gradients are taken with `torch.autograd.grad` on the perturbation only, so no parameter gets a
`.grad` and the weights never change.

Adversarial images come back as float pixel values in 0..255 (not rounded to uint8): at eps 0
they are the clean pixels exactly, so "FGSM at eps 0" reproduces the clean predictions bit for bit.

Example:
    >>> adv = pgd(model, pre, x_uint8, y, eps=8 / 255)          # float (B, C, H, W) in 0..255
    >>> (model(normalize_batch(adv, pre.mean, pre.std)).argmax(1) == y).float().mean()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from imagerec.config import PreprocessConfig
from imagerec.transforms import normalize_batch
from imagerec.utils import ImageRecError, did_you_mean

ATTACKS = ("fgsm", "pgd")

# PGD as in Madry et al. 2018: a uniform random start in the eps-ball, then signed-gradient steps
# projected back into it. 10 steps of eps/4 can travel 2.5 eps, so every corner of the ball is in
# reach from any start. Madry et al. used 40-100 steps on MNIST: fewer steps make a cheaper, somewhat
# weaker attack. Like every attack's, its accuracy is an upper bound on the true robust accuracy.
PGD_STEPS = 10
PGD_STEP_FRACTION = 0.25


def _loss_grad(model: nn.Module, pre: PreprocessConfig, x: torch.Tensor, delta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d(cross-entropy)/d(delta) at pixels x + 255 * delta (x in 0..255, delta in [0, 1] units).
    The caller keeps x + 255 * delta in 0..255. No clamp here: clamp's gradient is 0 at the bounds,
    which would freeze every black or white pixel (most of an MNIST digit) at its value."""
    delta = delta.detach().requires_grad_(True)
    with torch.enable_grad():
        adv = x + 255.0 * delta
        logits = model(normalize_batch(adv, pre.mean, pre.std).contiguous(memory_format=torch.channels_last)).float()
        loss = F.cross_entropy(logits, y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
    return grad


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_eps(eps: float) -> None:
    if not eps >= 0:  # also refuses NaN
        raise ImageRecError(f"eps must be >= 0 (in [0, 1] pixel units, e.g. 8/255), got {eps}")


def fgsm(model: nn.Module, pre: PreprocessConfig, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one step of eps along the loss gradient's
    sign. x: uint8 or float pixels (B, C, H, W) on the model's device; returns float pixels."""
    _check_eps(eps)
    x = x.float()
    with eval_mode(model):
        grad = _loss_grad(model, pre, x, torch.zeros_like(x), y)
    return (x + 255.0 * eps * grad.sign()).clamp(0.0, 255.0)


def pgd(model: nn.Module, pre: PreprocessConfig, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = PGD_STEPS,
        step_size: float | None = None, random_start: bool = True, seed: int = 0) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018), L-infinity: `steps` signed-gradient steps of
    `step_size` (default eps/4) from a seeded uniform start in the eps-ball, each projected back
    into the ball and the valid pixel range. Returns float pixels (B, C, H, W)."""
    _check_eps(eps)
    x = x.float()
    alpha = eps * PGD_STEP_FRACTION if step_size is None else step_size
    if random_start:
        g = torch.Generator().manual_seed(seed)
        delta = (torch.rand(x.shape, generator=g) * 2 - 1).mul_(eps).to(x.device)
    else:
        delta = torch.zeros_like(x)
    delta = ((x + 255.0 * delta).clamp(0.0, 255.0) - x) / 255.0  # keep the start inside the pixel range
    with eval_mode(model):
        for _ in range(steps):
            grad = _loss_grad(model, pre, x, delta, y)
            delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
            delta = ((x + 255.0 * delta).clamp(0.0, 255.0) - x) / 255.0
    return (x + 255.0 * delta).clamp(0.0, 255.0)


def run_attack(name: str, model: nn.Module, pre: PreprocessConfig, x: torch.Tensor, y: torch.Tensor, eps: float,
               seed: int = 0) -> torch.Tensor:
    """`fgsm` or `pgd` (default settings) by name."""
    if name == "fgsm":
        return fgsm(model, pre, x, y, eps)
    if name == "pgd":
        return pgd(model, pre, x, y, eps, seed=seed)
    raise ImageRecError(f"unknown attack '{name}': use one of {', '.join(ATTACKS)}.{did_you_mean(name, ATTACKS)}")
