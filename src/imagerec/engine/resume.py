"""The rules of `train --resume`: what a resumed run may change, what it must keep (its settings,
its data's classes), how a `--time-limit` run that had not yet planned plans, and how a resume
with another number of processes restarts its epoch."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from imagerec.config import TrainConfig
from imagerec.engine import distributed
from imagerec.engine.trainer import Trainer
from imagerec.utils import ImageRecError

log = logging.getLogger("imagerec")

# What may differ when a run is resumed: how long it trains, and where and how fast it runs. The
# rest (model, optimizer, batch size, data, augmentation, ...) shapes the saved state: a run
# resumed with another of them would crash on loading, or silently train something else (a new
# batch size rereads part of the epoch).
RESUME_CHANGEABLE = ("epochs", "time_limit", "early_stopping", "device", "precision", "workers", "cache",
                     "num_threads", "save_every_steps", "max_pixels", "channels_last", "deterministic")


def plan_deadline(time_limit: float, started: float, resume_state: dict[str, Any] | None) -> float | None:
    """When a `--time-limit` run must stop (a `time.perf_counter` instant), for the trainer to plan its
    epochs by; None when there is nothing to plan: no limit, or a resumed run that planned already
    (it keeps its plan). A run stopped before its first steps were timed planned nothing, so it
    plans now, with the time it has left."""
    if not time_limit:
        return None
    if resume_state is None:
        return started + 60 * time_limit
    if resume_state.get("planned") is False:
        return started + max(0.0, 60 * time_limit - float(resume_state.get("train_seconds", 0.0)))
    return None


def same_data(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def check_resume_overrides(saved: TrainConfig, cfg: TrainConfig, resume: str) -> None:
    """Refuse a resume that would change a setting the saved state depends on, naming it."""
    changed = [f"--{k.replace('_', '-')} {getattr(cfg, k)!r} (it was {getattr(saved, k)!r})"
               for k in dataclasses.asdict(cfg) if k not in (*RESUME_CHANGEABLE, "out", "data", "explicit")
               and getattr(cfg, k) != getattr(saved, k)]
    if not same_data(cfg.data, saved.data):
        changed.insert(0, f"DATA {cfg.data} (it was {saved.data})")
    if cfg.out != saved.out and Path(cfg.out).resolve() != Path(resume).resolve():
        changed.insert(0, f"--out {cfg.out} (--resume {resume} writes into that run)")
    if changed:
        raise ImageRecError(
            f"--resume {resume} cannot change {'; '.join(changed)}: the saved weights, optimizer and position in "
            f"the epoch depend on it. Resume without it, or start a new run with another --out. What can change: "
            f"{', '.join('--' + k.replace('_', '-') for k in RESUME_CHANGEABLE)}"
        )


def check_resume_classes(classes: list[str], saved: list[str], origin: str, resume: str) -> None:
    """Refuse a resume whose data's classes differ from the checkpoint's: labels are class indices,
    so an added, removed or renamed class would crash the counts or silently train the model's
    outputs on other classes than the ones its class names (and predict) say."""
    if classes == saved:
        return
    added, removed = [c for c in classes if c not in saved], [c for c in saved if c not in classes]
    what = "; ".join(f"{k}: {', '.join(repr(c) for c in v[:10])}{' ...' if len(v) > 10 else ''}"
                     for k, v in (("added", added), ("removed", removed)) if v)
    if len(added) == len(removed) == 1:
        what += f" (renamed {removed[0]!r} to {added[0]!r}?)"
    raise ImageRecError(
        f"--resume {resume}: the classes of {origin} changed since this run started "
        f"({what or 'the same classes in another order: ' + ', '.join(map(repr, classes[:10]))}); the run's outputs "
        f"are its classes {', '.join(map(repr, saved[:10]))}{' ...' if len(saved) > 10 else ''}, in that order, so "
        "training on would teach them the wrong labels. Restore the data's classes, or start a new run with another --out"
    )


def adapt_resume_to_world(trainer: Trainer, meta: dict[str, Any], steps_per_epoch: int) -> None:
    """Resuming with another number of processes: a step is one global batch (batch_size x processes),
    so the epoch's batches differ. Count the schedule in the new steps and restart a partial epoch."""
    before = meta.get("distributed", {}).get("world_size", 1)
    if before == distributed.world_size():
        return  # the same global batches: exact, even mid-epoch
    s = trainer.state
    if s.epoch_step:
        log.warning("%s stopped in epoch %d with %d process(es); with %d the epoch's batches differ, so it restarts "
                    "from its beginning", trainer.run_dir, s.epoch + 1, before, distributed.world_size())
    s.epoch_step, s.loss_sum, s.correct, s.seen = 0, 0.0, 0.0, 0
    s.global_step = s.epoch * steps_per_epoch


def resume_epochs_cap(cfg: TrainConfig, meta: dict[str, Any], overrides: dict[str, Any], resume: str) -> TrainConfig:
    """A `--time-limit` run stopped before it planned plans on resume under the `--epochs` it was
    given: `epochs_cap` in the checkpoint (train_config holds the plan, and which settings were
    explicit is not saved). A checkpoint from before `epochs_cap` was saved cannot say whether its
    --epochs was given: it plans with no cap, as it would have then, and says how to keep one."""
    if "epochs" in overrides or meta["state"].get("planned") is not False:
        return cfg  # an --epochs given now caps the plan; a run that planned keeps its plan
    if "epochs_cap" not in meta:
        log.warning("--resume %s: this checkpoint was saved before imagerec recorded the --epochs cap of a --time-limit "
                    "run, so the epochs are planned from the time left, with no cap; if the run was given --epochs N, "
                    "resume with --epochs N to keep it", resume)
    elif meta["epochs_cap"] is not None:
        cfg = dataclasses.replace(cfg, epochs=int(meta["epochs_cap"]), explicit=sorted({*cfg.explicit, "epochs"}))
    return cfg


def _changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'name N -> M' for each key whose count differs (0 where one side lacks it)."""
    return [f"{k} {before.get(k, 0)} -> {now.get(k, 0)}" for k in sorted({*before, *now}, key=str)
            if before.get(k, 0) != now.get(k, 0)]


def data_change_message(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """What changed in a resumed run's data (`meta["data"]` of its checkpoint and of now), whose
    classes are the same (`check_resume_classes`): the images per split and per training class."""
    splits = _changes(saved.get("counts") or {}, now.get("counts") or {})
    classes = _changes(saved.get("train_class_counts") or {}, now.get("train_class_counts") or {})
    what = "; ".join(filter(None, [
        f"images per split: {', '.join(splits)}" if splits else "",
        f"training images per class: {', '.join(classes[:10])}{' ...' if len(classes) > 10 else ''}" if classes else "",
    ])) or "the same number of images per split and class, but other files or labels (replaced, renamed or relabelled)"
    return (f"the data {now.get('origin')} changed since this run started ({what}); its classes are the same, so the run "
            "resumes, training on the data as it is now")
