"""Checkpoints: tensors in safetensors, everything else in JSON beside them. Nothing is unpickled.

`NAME.safetensors` holds `model.*` (the state dict) and `optim.<param>.<key>` (optimizer
tensors); `NAME.json` holds the format version, model name and arguments, preprocessing config,
class names, library versions, data fingerprint, training position and optimizer hyperparameters.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from imagerec.config import json_text
from imagerec.utils import ImageRecError, new_file_mode, write_error_text

FORMAT = "imagerec-checkpoint"
FORMAT_VERSION = 1
log = logging.getLogger("imagerec")
_warned_pending: set[tuple[str, str]] = set()  # (stem, weights_id) already warned about, once per process


class CheckpointWarning(UserWarning):
    """A checkpoint that still loads but was left unfinished. Said on the "imagerec" logger (one clean
    line); the warning itself is ignored unless asked for (pytest.warns, warnings.catch_warnings), so a
    terminal gets neither the message twice nor Python's "file:line: UserWarning:" and source line."""


warnings.filterwarnings("ignore", category=CheckpointWarning)


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
    """Write `<stem>.safetensors` and `<stem>.json` atomically (temp files + renames).
    `extra` holds other training state (e.g. lookahead weights), stored as `extra.<key>`.

    Both files carry the same random `weights_id`, so a pair from different saves is detected.
    Both temp files are complete before either rename: a kill between the two renames leaves
    `<stem>.json.tmp`, which readers use where it is (`read_checkpoint_meta`) and the writer
    finishes (`finish_interrupted_save`, also called here first, before a new save replaces that
    temp file). A save that fails (a full disk) removes its temp files and raises ImageRecError
    naming the file; the pair saved before stays."""
    stem = Path(path_stem)
    finish_interrupted_save(stem)
    tensors = {f"model.{k}": v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}
    weights_id = uuid.uuid4().hex
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "weights_id": weights_id}
    if optimizer is not None:
        opt_tensors, opt_meta = _optimizer_split(optimizer)
        tensors.update(opt_tensors)
        meta["optimizer_state"] = opt_meta
    tensors.update({f"extra.{k}": v.detach().contiguous().cpu() for k, v in (extra or {}).items()})
    json_tmp, weights_tmp = _tmp(stem, ".json"), _tmp(stem, ".safetensors")
    writing = stem.with_suffix(".json")
    try:
        json_tmp.write_text(json_text(meta))
        writing = stem.with_suffix(".safetensors")
        save_file(tensors, str(weights_tmp),
                  metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION), "weights_id": weights_id})
        os.chmod(weights_tmp, new_file_mode())  # safetensors' 0600 kept the weights from every other user
    except BaseException as e:
        # Nothing renamed yet: the pair saved before is whole. (A full disk in safetensors' writer
        # is a SafetensorError, not an OSError.)
        json_tmp.unlink(missing_ok=True)
        weights_tmp.unlink(missing_ok=True)
        if isinstance(e, OSError | SafetensorError):
            raise ImageRecError(f"{writing}: cannot save the checkpoint: {write_error_text(e)}. The {stem.name} "
                                f"checkpoint saved before it, if any, is unchanged; once that is fixed, continue the "
                                f"run with --resume") from e
        raise
    os.replace(weights_tmp, stem.with_suffix(".safetensors"))
    os.replace(json_tmp, stem.with_suffix(".json"))


def _tmp(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix + ".tmp")


def _weights_id(spath: Path) -> str | None:
    try:
        with safe_open(str(spath), framework="pt") as f:
            return (f.metadata() or {}).get("weights_id")
    except (SafetensorError, OSError, ValueError):
        return None  # unreadable weights: load_checkpoint_tensors names the damage


def _json_dict(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`; None when it is missing, unreadable or not an object."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return None
    return obj if isinstance(obj, dict) else None


def _interrupted_save(stem: Path, meta: dict[str, Any] | None) -> tuple[str, dict[str, Any] | None] | None:
    """None when `meta` (None: no `<stem>.json`) belongs to the weights `<stem>.safetensors` (or there
    are no readable weights, or a checkpoint from before weights_id); else (the weights' id, the
    metadata of the save that was killed between its two renames, `<stem>.json.tmp`, when it belongs
    to them, or None)."""
    spath = stem.with_suffix(".safetensors")
    wid = _weights_id(spath) if spath.is_file() else None
    if wid is None or (meta is not None and meta.get("weights_id") in (None, wid)):
        return None
    pending = _json_dict(_tmp(stem, ".json"))
    return wid, (pending if pending is not None and pending.get("weights_id") == wid else None)


def _pair_meta(stem: Path, meta: dict[str, Any] | None) -> dict[str, Any] | None:
    """`meta` (None: no `<stem>.json`), or the metadata of a save that was killed between its two
    renames, read from `<stem>.json.tmp` and left there: a reader never renames (its folder may be
    read-only, and a rename during a live run's save would make the trainer's own second rename
    fail); only the writer does (`finish_interrupted_save`)."""
    found = _interrupted_save(stem, meta)
    if found is None:
        return meta
    wid, pending = found
    if pending is None:
        again = _json_dict(stem.with_suffix(".json"))  # the writer may have just made its second rename
        if again is not None and again.get("weights_id") == wid:
            return again
        if meta is None:
            return None
        raise ImageRecError(
            f"{stem.with_suffix('.safetensors')} and {stem.with_suffix('.json').name} come from different saves (one "
            "was interrupted and cannot be completed); use the run's other checkpoint (best/last) or train again")
    if (str(stem), wid) not in _warned_pending:
        _warned_pending.add((str(stem), wid))
        message = (f"{stem}: its last save was interrupted between its two files; using the metadata in "
                   f"{_tmp(stem, '.json').name} (train --resume finishes that save)")
        log.warning(message)
        warnings.warn(message, CheckpointWarning, stacklevel=4)
    return pending


def finish_interrupted_save(path_stem: str | Path) -> bool:
    """Finish a save of `<stem>` that was killed between its two renames (rename `<stem>.json.tmp`
    over `<stem>.json`); True when there was one. For the writer of the run only (train, --resume,
    under the run's lock): readers use that metadata where it is and never rename."""
    stem = Path(path_stem)
    jpath = stem.with_suffix(".json")
    found = _interrupted_save(stem, _json_dict(jpath))
    if found is None or found[1] is None:
        return False  # a pair, or the temp files of a save killed before its first rename
    try:
        os.replace(_tmp(stem, ".json"), jpath)
    except OSError as e:
        raise ImageRecError(f"cannot write {jpath} (to finish a checkpoint save that was interrupted): "
                            f"{write_error_text(e)}; the run folder must be writable to train into it") from e
    log.warning("%s: finished a checkpoint save that was interrupted between its two files", stem)
    return True


def read_checkpoint_meta(path_stem: str | Path) -> dict[str, Any]:
    stem = Path(path_stem)
    jpath = stem.with_suffix(".json")
    damaged = "the file is damaged; use the run's other checkpoint (best/last) or train again"
    if not jpath.is_file():
        meta = _pair_meta(stem, None)  # a first save killed between its two renames
        if meta is None:
            if (stem.parent / "config.yaml").is_file():
                raise ImageRecError(f"{stem.parent} holds a run that stopped before its first checkpoint: nothing to "
                                    "resume; train it again with the same --out (--save-every-steps N saves during an epoch)")
            raise ImageRecError(f"no checkpoint at {stem}: {jpath.name} is missing (is this an imagerec run directory?)")
    else:
        try:
            meta = json.loads(jpath.read_text())
        except json.JSONDecodeError as e:
            raise ImageRecError(f"{jpath}: checkpoint metadata is not valid JSON ({e.msg}); {damaged}") from e
        except UnicodeDecodeError as e:  # bytes that are not UTF-8: json never saw text
            raise ImageRecError(f"{jpath}: checkpoint metadata is not UTF-8 text (byte {e.start}); {damaged}") from e
        except OSError as e:
            raise ImageRecError(f"{jpath}: cannot read the checkpoint metadata ({e.strerror or e})") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ImageRecError(f"{jpath}: not an imagerec checkpoint")
        meta = _pair_meta(stem, meta)
    if meta.get("format") != FORMAT:
        raise ImageRecError(f"{_tmp(stem, '.json')}: not an imagerec checkpoint")
    if not isinstance(meta.get("format_version", 0), int):
        raise ImageRecError(f"{jpath}: checkpoint format_version {meta['format_version']!r} is not a number; {damaged}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
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
        with safe_open(str(spath), framework="pt") as f:
            wid = (f.metadata() or {}).get("weights_id")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except (SafetensorError, OSError, ValueError) as e:
        raise ImageRecError(f"{spath}: cannot read checkpoint weights ({e}); the file is damaged or incomplete") from e
    if wid is not None and has_checkpoint(spath.with_suffix("")):
        read_checkpoint_meta(spath.with_suffix(""))  # names a mismatched pair
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    return model, {k: v for k, v in tensors.items() if not k.startswith("model.")}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    if "optimizer_state" not in meta:
        raise ImageRecError("the checkpoint has no optimizer state; it cannot be resumed exactly")
    optimizer.load_state_dict(_optimizer_join(tensors, meta["optimizer_state"]))


def has_checkpoint(path_stem: str | Path) -> bool:
    """Whether `<stem>` is a saved checkpoint (its JSON, or a save killed between its two renames,
    whose metadata `read_checkpoint_meta` reads from its temp file); temp files of a save killed
    earlier are none."""
    stem = Path(path_stem)
    return stem.with_suffix(".json").is_file() or _pair_meta(stem, None) is not None


def best_is_in_last(run_dir: str | Path) -> bool:
    """True when the run's best weights are in `last` only: the run was killed after saving `last` at
    the end of its best epoch, before saving `best` (the trainer saves `last` first, so a finished
    epoch is never lost). `--resume` saves them as `best` again; until then readers use `last`."""
    d = Path(run_dir)
    if not has_checkpoint(d / "last"):
        return False
    try:
        state = read_checkpoint_meta(d / "last").get("state")
        if not isinstance(state, dict) or state.get("epoch_step") != 0 or not isinstance(state.get("epoch"), int):
            return False
        if state["epoch"] < 1 or state.get("best_epoch") != state["epoch"]:
            return False  # `last` trained past the best epoch: its weights are not the best ones
        if not has_checkpoint(d / "best"):
            return True
        best = read_checkpoint_meta(d / "best").get("state")
    except ImageRecError:
        return False  # a damaged checkpoint: reading it names the damage
    epoch = best.get("epoch") if isinstance(best, dict) else None
    return isinstance(epoch, int) and epoch < state["epoch"]


def find_run_checkpoint(run_dir: str | Path, which: str = "best") -> Path:
    """The stem of DIR/best (or DIR/last when there is no best, or when `last` holds a newer best
    epoch than `best`: see `best_is_in_last`)."""
    d = Path(run_dir)
    if not d.exists():
        raise ImageRecError(f"run directory not found: {d}")
    if d.is_file() and d.suffix in (".json", ".safetensors"):
        return d.with_suffix("")
    if which == "best" and d.is_dir() and best_is_in_last(d):
        return d / "last"
    for name in (which, "last", "best"):
        if has_checkpoint(d / name):
            return d / name
    raise ImageRecError(f"{d}: no checkpoint found (expected best.json/best.safetensors from 'imagerec train')"
                        f"{_bundle_hint(d)}")


def _bundle_hint(folder: Path) -> str:
    """What to pass instead when `folder` is an export bundle (its `imagerec.json` names the run it
    came from): eval, export and robustness of a run take the run, and the bare "no checkpoint"
    left the user guessing why a folder that predicts fine is refused."""
    manifest = _json_dict(folder / "imagerec.json")
    if manifest is None or manifest.get("format") != "imagerec-bundle":
        return ""
    source = manifest.get("source")
    run = source.get("run_dir") if isinstance(source, dict) else None
    where = f"its run, {run}" if isinstance(run, str) and run else "the run it was exported from"
    return f": {folder} is an exported bundle, not a run; pass {where} (predict and benchmark take bundles)"


def load_model(source: str | Path, which: str = "best") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model of a run directory (or checkpoint stem) with its weights, in eval mode."""
    from imagerec.models import create_model
    from imagerec.models.timm_models import trained_models_allowed

    stem = find_run_checkpoint(source, which)
    meta = read_checkpoint_meta(stem)
    weights, _ = load_checkpoint_tensors(stem)
    try:
        pre = meta["preprocess"]
        name, num_classes, kwargs = meta["model"], len(pre["class_names"]), dict(meta.get("model_kwargs", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise ImageRecError(f"{stem}.json: checkpoint metadata lacks a readable model, preprocess or class_names "
                            f"({type(e).__name__}: {e}); the file is damaged") from e
    with trained_models_allowed():  # as it was trained, even at a size later refused for new runs
        model = create_model(name, num_classes=num_classes, **kwargs)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        # PyTorch's first line only says "Error(s) in loading state_dict for ConvNet:"; what differs follows.
        details = [line.strip().rstrip(".")[:200] for line in str(e).splitlines()[1:] if line.strip()]
        shown = "; ".join(details[:3]) + (f"; and {len(details) - 3} more" if len(details) > 3 else "")
        raise ImageRecError(
            f"{stem}.safetensors does not match model '{meta['model']}' as {stem.name}.json describes it "
            f"({len(pre['class_names'])} classes, model_kwargs {kwargs}): {shown or str(e).splitlines()[0]}. The two "
            f"files disagree (one was edited or replaced): use the run's other checkpoint (best/last) or train again") from e
    return model.eval(), meta
