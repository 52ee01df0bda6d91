"""Checkpoints: tensors in safetensors, everything else in JSON beside them. Nothing is unpickled.

`NAME.safetensors` holds `model.*` (the state dict) and `optim.<param>.<key>` (optimizer
tensors); `NAME.json` holds the format version, model name and arguments, preprocessing config,
class names, library versions, data fingerprint, training position and optimizer hyperparameters.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from imagerec.config import write_json
from imagerec.utils import ImageRecError

FORMAT = "imagerec-checkpoint"
FORMAT_VERSION = 1


def _optimizer_split(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalar_state": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if not key.startswith("optim."):
            continue  # other training state (extra.*)
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for pid, extra in meta.get("scalar_state", {}).items():
        state.setdefault(int(pid), {}).update(extra)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    path_stem: str | Path,
    model: torch.nn.Module,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write `<stem>.safetensors` and `<stem>.json` atomically (temp file + rename).
    `extra` holds other training state (e.g. lookahead weights), stored as `extra.<key>`."""
    stem = Path(path_stem)
    tensors = {f"model.{k}": v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
    if optimizer is not None:
        opt_tensors, opt_meta = _optimizer_split(optimizer)
        tensors.update(opt_tensors)
        meta["optimizer_state"] = opt_meta
    tensors.update({f"extra.{k}": v.detach().contiguous().cpu() for k, v in (extra or {}).items()})
    tmp = stem.with_name(stem.name + ".safetensors.tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    os.replace(tmp, stem.with_suffix(".safetensors"))
    write_json(stem.with_suffix(".json"), meta)


def read_checkpoint_meta(path_stem: str | Path) -> dict[str, Any]:
    stem = Path(path_stem)
    jpath = stem.with_suffix(".json")
    if not jpath.is_file():
        if (stem.parent / "config.yaml").is_file():
            raise ImageRecError(f"{stem.parent} holds a run that stopped before its first checkpoint: nothing to resume; "
                                "train it again (--save-every-steps N saves during an epoch)")
        raise ImageRecError(f"no checkpoint at {stem}: {jpath.name} is missing (is this an imagerec run directory?)")
    try:
        meta = json.loads(jpath.read_text())
    except json.JSONDecodeError as e:
        raise ImageRecError(f"{jpath}: checkpoint metadata is not valid JSON ({e.msg}); the file is damaged") from e
    if meta.get("format") != FORMAT:
        raise ImageRecError(f"{jpath}: not an imagerec checkpoint")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ImageRecError(
            f"{jpath}: checkpoint format {meta['format_version']} is newer than this imagerec supports "
            f"({FORMAT_VERSION}); upgrade imagerec"
        )
    return meta


def load_checkpoint_tensors(path_stem: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model state dict, training state: the `optim.*` and `extra.*` tensors) from `<stem>.safetensors`."""
    spath = Path(path_stem).with_suffix(".safetensors")
    if not spath.is_file():
        raise ImageRecError(f"checkpoint weights missing: {spath}")
    try:
        tensors = load_file(str(spath))
    except (SafetensorError, OSError, ValueError) as e:
        raise ImageRecError(f"{spath}: cannot read checkpoint weights ({e}); the file is damaged or incomplete") from e
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    return model, {k: v for k, v in tensors.items() if not k.startswith("model.")}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    if "optimizer_state" not in meta:
        raise ImageRecError("the checkpoint has no optimizer state; it cannot be resumed exactly")
    optimizer.load_state_dict(_optimizer_join(tensors, meta["optimizer_state"]))


def find_run_checkpoint(run_dir: str | Path, which: str = "best") -> Path:
    """The stem of DIR/best (or DIR/last when there is no best)."""
    d = Path(run_dir)
    if not d.exists():
        raise ImageRecError(f"run directory not found: {d}")
    if d.is_file() and d.suffix in (".json", ".safetensors"):
        return d.with_suffix("")
    for name in (which, "last", "best"):
        if (d / f"{name}.json").is_file():
            return d / name
    raise ImageRecError(f"{d}: no checkpoint found (expected best.json/best.safetensors from 'imagerec train')")


def load_model(source: str | Path, which: str = "best") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model of a run directory (or checkpoint stem) with its weights, in eval mode."""
    from imagerec.models import create_model

    stem = find_run_checkpoint(source, which)
    meta = read_checkpoint_meta(stem)
    weights, _ = load_checkpoint_tensors(stem)
    pre = meta["preprocess"]
    model = create_model(meta["model"], num_classes=len(pre["class_names"]), **meta.get("model_kwargs", {}))
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ImageRecError(f"{stem}.safetensors does not match model '{meta['model']}': {str(e).splitlines()[0]}") from e
    return model.eval(), meta
