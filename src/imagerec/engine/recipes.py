"""Training recipes: named sets of settings that fill in every setting the user left at its default.

`fast` is airbench94 (Keller Jordan, 2024) brought to imagerec's trainer, for small images
(MNIST-like and CIFAR-like). What it sets, and why:

- model `airbench`: whitening stem, three conv groups, TTA in eval (see models/airbench.py);
- SGD, Nesterov momentum 0.85. airbench's lr 11.5 is per 1024 examples of a *summed* loss and
  divided by (1 + 1/(1 - momentum)); for our mean loss that is lr = 1.5 * batch / 1024. Its
  weight decay 0.0153 per 1024 examples is the same absolute shrink per step as a coupled
  decay of 0.0153 / 11.5 = 0.00133 at that lr;
- BatchNorm shifts train 64x faster (`norm_lr_scale`), with their decay scaled down to match;
- the triangle schedule: 0.2 -> 1 over 23% of the steps, then down to 0.07;
- label smoothing 0.2; lookahead averaging every 5 steps;
- batch augmentation only: 2-pixel random translation, and horizontal flips on colour images
  (never on grayscale, where the recipe assumes digits or text);
- no cutout: airbench96 adds a 12-px cutout for its 45 epochs, but at the epochs 20 minutes hold
  on 2 cores it underfits: airbench94, 11 epochs on CIFAR-10-jpg, 89.48% with `--cutout 12` vs
  91.00% without (one run each, same machine; train accuracy 88.3% vs 96.2% in the last epoch),
  and with the 27 epochs 19 minutes hold on an AMX CPU it gives 91.31%, the same as without;
- all training images are trained on (no val split) when the data has a test split: like
  airbench, the recipe's epochs are fixed, so there is nothing for a val split to choose
  (unless --early-stopping or --val-fraction asks for one: then the val split stays).
- epochs and width per image kind were chosen by measuring time-to-accuracy on a 2-core CPU
  without bf16 (README "Performance"): on colour 32px images 64-128-256 wide, batch 512 (faster
  per image than 1024 on a CPU: 340 vs 210 img/s), 6 epochs: 88.3% on CIFAR-10-jpg in 18.5 min
  there; on 28px grayscale 16-32-64 wide with a stride-2 stem (4x fewer FLOPs, 3.7x the img/s),
  one epoch of batch 256 at lr 0.6 (lr 0.375 gave 99.07%, 0.6 gave 99.16%): MNIST 99.16% in ~9 s.
- BatchNorm eps is 1e-5, not airbench's 1e-12: with the stride-2 stem the last group sees 1x1
  maps, and 1e-12 let a near-constant channel blow up to NaN in the first epoch.
- grayscale runs clip the gradient norm at 5: digits on a blank background give near-constant
  channels whose BatchNorm turns the first steps' gradients huge (max |grad| ~2e5 at step 1, in
  fp32 and bf16 alike). fp32 survives that; with bf16 autocast (AVX512-BF16 CPUs) mnist-mini
  diverged to NaN for seed 0 and collapsed to 10% with lr 0.375 or BN eps 1e-4, while the clip
  trained it to 98.1% / 97.6% (seeds 0, 1) in 3 epochs.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from imagerec.config import TrainConfig

log = logging.getLogger("imagerec")

FAST: dict[str, Any] = {
    "model": "airbench",
    "optimizer": "sgd",
    "momentum": 0.85,
    "weight_decay": 0.0153 / 11.5,
    "norm_lr_scale": 64.0,
    "schedule": "triangle",
    "label_smoothing": 0.2,
    "lookahead": True,
    "augment": "light",
    "translate": 2,
}
FAST_SMALL_GRAY = {"epochs": 1, "batch_size": 256, "lr": 0.6, "hflip": False, "grad_clip": 5.0}
FAST_COLOUR = {"epochs": 6, "batch_size": 512, "hflip": True}
SGD_SETTINGS = ("optimizer", "lr", "momentum", "weight_decay", "norm_lr_scale")  # tuned for the recipe's SGD


def apply_recipe(cfg: TrainConfig, channels: int, size: int, has_test_split: bool) -> TrainConfig:
    """`cfg` with its recipe's settings in every field the user did not set (`cfg.explicit`) and that
    is still at TrainConfig's default (a TrainConfig built directly has no record of what was set)."""
    if cfg.recipe == "default":
        return cfg
    if size > 64:
        log.warning("--recipe fast is tuned for images of 64 px or less; these are %d px", size)
    settings = {**FAST, **(FAST_SMALL_GRAY if channels == 1 else FAST_COLOUR)}
    if has_test_split and not cfg.early_stopping:
        # --early-stopping watches a val split: with it the user asked for one, so the recipe keeps it.
        settings["val_fraction"] = 0.0
    defaults = TrainConfig()
    if cfg.optimizer != FAST["optimizer"] and ("optimizer" in cfg.explicit or cfg.optimizer != defaults.optimizer):
        # The recipe's lr, decay, momentum and BatchNorm lr scale are SGD's (see above): filled in
        # for another optimizer they trained AdamW at lr 0.6 (BatchNorm shifts at 38) to chance
        # accuracy. That optimizer keeps its own defaults instead.
        log.warning("--recipe fast is tuned for SGD; with --optimizer %s it leaves lr, weight decay and momentum at "
                    "%s's defaults (give --lr/--weight-decay to set them), or leave out --optimizer", cfg.optimizer, cfg.optimizer)
        settings = {k: v for k, v in settings.items() if k not in SGD_SETTINGS}
    updates = {k: v for k, v in settings.items()
               if k not in cfg.explicit and getattr(cfg, k) == getattr(defaults, k)}
    cfg = dataclasses.replace(cfg, **updates)
    if cfg.lr is None and cfg.optimizer == FAST["optimizer"]:  # else the optimizer's default (optim.resolve_lr_wd)
        cfg = dataclasses.replace(cfg, lr=1.5 * cfg.batch_size / 1024)
    return cfg
