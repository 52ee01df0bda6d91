"""Pretrained weights from safetensors files, imagerec runs or the Hugging Face Hub; optimizer param groups.

Weights are only ever read with safetensors: a checkpoint cannot run code when it is loaded.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import DropBlock2d, DropPath, resample_abs_pos_embed
from torch import nn

from imagerec.utils import ImageRecError

HF_PREFIX = "hf-hub:"
MODEL_PREFIX = "model."
RUN_WEIGHT_FILES = ("best.safetensors", "last.safetensors")
POS_EMBED_NAME = "pos_embed"  # timm's absolute position embedding, (1, prefix + H*W, C)

log = logging.getLogger("imagerec")


def classifier_parameter_names(model: nn.Module) -> set[str]:
    """Names, as in `model.named_parameters()`, of the parameters of `model.get_classifier()`."""
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    return {n for n, p in model.named_parameters() if id(p) in head_ids}


def _classifier_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys (parameters and buffers) of the classifier module."""
    head = model.get_classifier()
    keys = classifier_parameter_names(model)
    for prefix, module in model.named_modules():
        if module is head:
            keys |= {f"{prefix}.{k}" if prefix else k for k in head.state_dict()}
    return keys


def _resolve_source(source: str) -> Path:
    """Turn a source string into a local .safetensors path (downloading from the Hub if asked)."""
    if source.startswith(HF_PREFIX):
        return _download_hf(source[len(HF_PREFIX):])
    path = Path(source).expanduser()
    if path.is_dir():
        for name in RUN_WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        if (path / "imagerec.json").is_file():  # an export bundle: its weights are inside a graph, not tensors to load
            raise ImageRecError(f"'{path}' is an exported bundle, not a run: its weights cannot be fine-tuned; point at "
                                f"the run it was exported from (source.run_dir in its imagerec.json)")
        raise ImageRecError(
            f"run directory '{path}' has neither {' nor '.join(RUN_WEIGHT_FILES)}: "
            f"point at a finished run, or at a .safetensors file"
        )
    if not path.is_file():
        raise ImageRecError(
            f"pretrained weights '{source}' not found: give a .safetensors file, an imagerec run "
            f"directory, or hf-hub:ORG/NAME"
        )
    return path


def _download_hf(repo_id: str) -> Path:
    hint = (
        f"could not get model.safetensors from Hugging Face repo '{repo_id}': no network is reachable, "
        f"or the repo has no model.safetensors. Download it elsewhere and pass the local .safetensors path instead"
    )
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise ImageRecError(f"{hint} (huggingface_hub is not installed)") from e
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename="model.safetensors"))
    except Exception as e:  # the hub raises many types (HTTP, offline, validation); all mean the same to the user
        raise ImageRecError(f"{hint} ({type(e).__name__}: {e})") from e


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file; keep only `model.`-prefixed ones if any exist."""
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ImageRecError(
            f"'{path}' is not a readable safetensors file ({e}): imagerec loads weights only from "
            f".safetensors (never pickle); convert it with safetensors.torch.save_file"
        ) from e
    # imagerec checkpoints hold model + optimizer state side by side; plain files (timm, HF) hold only the model.
    if any(k.startswith(MODEL_PREFIX) for k in tensors):
        return {k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    return tensors


def _input_conv_name(model: nn.Module) -> str | None:
    """The first 4-D parameter is the input conv (stem / patch embedding) in every model here."""
    return next((n for n, p in model.named_parameters() if p.ndim == 4), None)


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor | None:
    """Re-shape a conv weight (O, I, kh, kw) to `in_chans` inputs, as timm's adapt_input_conv; None if impossible."""
    src = weight.shape[1]
    w = weight.float()
    if in_chans == 1:
        out = w.sum(dim=1, keepdim=True)  # grey = R + G + B keeps the response to a grey image
    elif src == 1:
        out = w.repeat(1, in_chans, 1, 1) / in_chans
    elif src == 3:
        reps = math.ceil(in_chans / 3)
        out = w.repeat(1, reps, 1, 1)[:, :in_chans] * (3 / in_chans)
    else:
        return None
    return out.to(weight.dtype)


def _resample_pos_embed(model: nn.Module, tensor: torch.Tensor, want: torch.Tensor) -> tuple[torch.Tensor, str] | None:
    """A ViT position embedding (1, prefix + h*w, C) trained on another patch grid, resampled to the
    model's grid as timm does when it loads weights at another image size, with a note saying so;
    None if it is not one."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None or tensor.ndim != 3 or want.ndim != 3 or tensor.shape[0] != 1 or want.shape[0] != 1:
        return None
    if tensor.shape[2] != want.shape[2]:
        return None
    prefix = want.shape[1] - grid[0] * grid[1]  # class/register tokens with their own embedding
    old = tensor.shape[1] - prefix
    side = math.isqrt(max(old, 0))
    if prefix < 0 or old <= 0 or side * side != old:
        return None
    new = resample_abs_pos_embed(tensor, new_size=list(grid), old_size=[side, side], num_prefix_tokens=prefix)
    return new, f"{side}x{side} -> {grid[0]}x{grid[1]} patches"


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(d) for d in t.shape) or "scalar"


def load_pretrained(model: nn.Module, source: str) -> dict[str, Any]:
    """Load backbone weights from `source` into `model`, leaving its classifier as built.

    `source` is a .safetensors file, an imagerec run directory (best.safetensors, else
    last.safetensors) or `hf-hub:ORG/NAME`. Classifier tensors are skipped. An input conv that
    differs only in input channels is adapted, and a ViT position embedding trained at another
    image size is resampled to this model's patch grid; other tensors whose shape does not match
    are skipped with a warning (they keep their random init). Weights holding NaN/inf are refused.

    Example:
        >>> model = create_model("resnet18", num_classes=5)
        >>> report = load_pretrained(model, "runs/exp1")  # {"loaded": 120, "skipped": [...], "missing": [...]}
    """
    path = _resolve_source(source)
    tensors = _read_state(path)
    target = model.state_dict()
    head_keys = _classifier_state_keys(model)
    conv_name = _input_conv_name(model)

    matched: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    mismatched: list[str] = []  # "name (file AxB, model CxD)" of backbone tensors left at their init
    resampled: list[str] = []
    for name, tensor in tensors.items():
        want = target.get(name)
        if want is None or name in head_keys:
            skipped.append(name)
            continue
        if tensor.shape != want.shape and name == conv_name and tensor.ndim == 4 and (
            tensor.shape[0] == want.shape[0] and tensor.shape[2:] == want.shape[2:]
        ):
            adapted = adapt_input_conv(tensor, want.shape[1])
            tensor = adapted if adapted is not None else tensor
        if tensor.shape != want.shape and name == POS_EMBED_NAME:
            done = _resample_pos_embed(model, tensor, want)
            if done is not None:
                tensor, note = done
                resampled.append(f"{name} ({note})")
        if tensor.shape != want.shape:
            skipped.append(name)
            mismatched.append(f"{name} (file {_shape(tensor)}, model {_shape(want)})")
            continue
        matched[name] = tensor

    # Scalars (BatchNorm's num_batches_tracked) match in any model with BatchNorm: weights of another
    # architecture matched only those, and the run trained from scratch believing it fine-tuned.
    if not any(t.ndim > 0 for t in matched.values()):
        raise ImageRecError(
            f"no weight tensor in '{path}' matches {type(model).__name__} (names or shapes all differ"
            f"{'; only BatchNorm step counters did' if matched else ''}): check that the weights were saved "
            f"from the same architecture"
        )
    # A checkpoint saved after training diverged: loaded, the loss is NaN from the first step and the
    # trainer's "lower --lr" advice would send the user the wrong way.
    bad = next((n for n in target if n in matched and matched[n].is_floating_point()
                and not bool(torch.isfinite(matched[n]).all())), None)  # the first in the model's order
    if bad is not None:
        raise ImageRecError(
            f"'{path}': tensor {bad} holds NaN/inf values (saved after training diverged?): start from an "
            f"earlier checkpoint of that run, or from other weights"
        )
    model.load_state_dict(matched, strict=False)
    if resampled:
        log.info("pretrained weights from '%s': position embedding resampled to this --image-size's patch grid "
                 "(bicubic, as timm does): %s", path, ", ".join(resampled))
    if mismatched:
        shown = ", ".join(mismatched[:8]) + (f" and {len(mismatched) - 8} more" if len(mismatched) > 8 else "")
        log.warning("pretrained weights from '%s': %d backbone tensor(s) skipped because their shape differs, so they "
                    "start from random init: %s. Pretrain the same --model at the same --image-size to load them all",
                    path, len(mismatched), shown)
    missing = sorted(k for k in target if k not in matched)
    # Backbone tensors the file does not name at all (weights of a shallower net, a partial state dict):
    # loaded silently, the run trained mostly from random init while the log said it fine-tuned.
    data_init = set(getattr(model, "data_init_keys", ()))  # set from the training images when not loaded
    absent = [k for k in missing if k not in head_keys and k not in tensors and k not in data_init
              and not k.endswith("num_batches_tracked")]
    if absent:
        shown = ", ".join(absent[:8]) + (f" and {len(absent) - 8} more" if len(absent) > 8 else "")
        log.warning("pretrained weights from '%s': %d backbone tensor(s) of %s are not in the file, so they start from "
                    "random init: %s. Check that the file holds the whole model, saved from the same --model",
                    path, len(absent), type(model).__name__, shown)
    return {"loaded": len(matched), "skipped": sorted(skipped), "missing": missing, "resampled": resampled,
            "mismatched": mismatched}


def set_frozen_norms_eval(model: nn.Module) -> int:
    """Put the frozen backbone's train-mode-only layers in eval mode; the number of layers set. With a
    frozen backbone the trainer calls this after every `model.train()`. BatchNorm: in train mode it
    would normalise with each batch's statistics and overwrite the pretrained running mean/var, so the
    "frozen" backbone would change (timm's `freeze` does the same). Dropout, DropPath, DropBlock and a
    recurrent net's inter-layer dropout: a frozen backbone is a fixed feature extractor, and with them
    active the head trained on randomly masked features that eval, predict and export never give it.
    Dropout in the head (`get_classifier()`, modules named `head*` such as timm's `head_drop`) stays on."""
    head = {id(m) for m in model.get_classifier().modules()}
    head_drops = {id(x) for name, m in model.named_modules() if name.split(".")[0].startswith("head") for x in m.modules()}
    drops = (nn.modules.dropout._DropoutNd, nn.RNNBase, DropPath, DropBlock2d)
    layers = [m for m in model.modules() if id(m) not in head and (
        isinstance(m, nn.modules.batchnorm._NormBase) or (isinstance(m, drops) and id(m) not in head_drops))]
    for m in layers:
        m.eval()
    return len(layers)


def _no_decay_names(model: nn.Module) -> set[str]:
    """Names timm models declare as not to be decayed (position embeddings, class tokens)."""
    fn = getattr(model, "no_weight_decay", None)
    return set(fn()) if callable(fn) else set()


def create_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_lr_scale: float = 1.0,
    freeze_backbone: bool = False,
) -> list[dict[str, Any]]:
    """Optimizer param groups: backbone/head x decay/no-decay; biases and 1-D params get no decay.

    With `freeze_backbone`, backbone parameters get `requires_grad=False` and are left out (the
    trainer keeps the backbone's BatchNorm layers in eval mode: `set_frozen_norms_eval`).

    Example:
        >>> groups = create_param_groups(model, lr=1e-3, weight_decay=0.05, backbone_lr_scale=0.1)
        >>> optimizer = torch.optim.AdamW(groups)
    """
    if backbone_lr_scale < 0:
        raise ImageRecError(f"backbone_lr_scale={backbone_lr_scale} is negative: use a value >= 0 (0.1 is typical)")
    head_names = classifier_parameter_names(model)
    skip_decay = _no_decay_names(model)
    buckets: dict[str, list[nn.Parameter]] = {k: [] for k in ("backbone_decay", "backbone_no_decay", "head_decay", "head_no_decay")}
    for name, p in model.named_parameters():
        is_head = name in head_names
        if freeze_backbone and not is_head:
            p.requires_grad_(False)
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in skip_decay
        buckets[f"{'head' if is_head else 'backbone'}_{'no_decay' if no_decay else 'decay'}"].append(p)

    backbone_lr = lr * backbone_lr_scale
    settings = {
        "backbone_decay": (backbone_lr, weight_decay),
        "backbone_no_decay": (backbone_lr, 0.0),
        "head_decay": (lr, weight_decay),
        "head_no_decay": (lr, 0.0),
    }
    groups = [
        {"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
        for name, params in buckets.items()
        if params
    ]
    if not groups:
        raise ImageRecError(
            f"{type(model).__name__} has no trainable parameters (frozen backbone and no classifier?): "
            f"build it with num_classes > 0 or drop freeze_backbone"
        )
    return groups
