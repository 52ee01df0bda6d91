"""`train()`: from a TrainConfig to a finished run directory (the function behind `imagerec train`).

Run directory: config.yaml (resolved settings), best/last checkpoints (.safetensors + .json),
history.csv, metrics.json, eval-<split>.json and confusion-<split>.png; `.train.lock` while a process
trains into it (`run_dir`).

Under torchrun every process runs `train()`; rank 0 alone writes the run directory and prints.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console

from imagerec.config import PreprocessConfig, TrainConfig, apply_overrides, json_text, legacy_mixing
from imagerec.data import read_data, split_train_val
from imagerec.data.readers import single_class_message
from imagerec.engine import distributed
from imagerec.engine.balance import class_counts, class_weights, imbalance_ratio, resolve_balance
from imagerec.engine.callbacks import Callback, EarlyStopping, HistoryCSV, ProgressBar
from imagerec.engine.checkpoint import load_checkpoint_tensors, read_checkpoint_meta, restore_optimizer
from imagerec.engine.data_prep import (
    limit_items,
    norm_for_channels,
    record_train_subset,
    source_preprocess,
    warn_untrained_classes,
)
from imagerec.engine.evaluate import eval_outputs, unreadable_split_message
from imagerec.engine.loaders import (
    any_readable,
    count_text,
    counts_exact,
    create_run_loader,
    infer_geometry,
    measure_mean_std,
    train_image_count,
    uint8_sample,
)
from imagerec.engine.optim import create_optimizer, resolve_lr_wd
from imagerec.engine.pipeline import BatchPipeline
from imagerec.engine.recipes import apply_recipe
from imagerec.engine.resume import (
    adapt_resume_to_world,
    check_resume_classes,
    check_resume_overrides,
    data_change_message,
    plan_deadline,
    resume_epochs_cap,
)
from imagerec.engine.run_dir import checkpoint_ids, claim_run_dir, lock_for_resume, precheck_out, recorded_metrics
from imagerec.engine.task import ClassificationTask
from imagerec.engine.trainer import StepStop, Trainer
from imagerec.models import count_parameters, create_model, load_pretrained
from imagerec.transforms import BatchAugment, normalize_batch
from imagerec.utils import (
    CpuLoadProbe,
    ImageRecError,
    atomic_write,
    atomic_write_files,
    library_versions,
    mix_seed,
    resolve_precision,
    setup_compute,
    write_error_text,
)

log = logging.getLogger("imagerec")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    model_name: str
    interrupted: bool = False
    main_process: bool = True  # False on torchrun ranks other than 0, which write nothing






def _launcher(world: int) -> str:
    """The command that starts a run like this one, for resume hints."""
    return f"torchrun --nproc_per_node {distributed.local_world_size()} -m imagerec" if world > 1 else "imagerec"


def _last_saved(run_dir: Path) -> str | None:
    """Where `run_dir`/last stands ("epoch E, step S"), or None when there is no checkpoint yet."""
    try:
        saved = json.loads((run_dir / "last.json").read_text())["state"]
        return f"epoch {saved['epoch'] + 1}, step {saved['epoch_step']}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _needs_data_init(model: torch.nn.Module, not_loaded: set[str] | None) -> bool:
    """Whether `model.init_from_data` should set its data-derived weights: not when --pretrained
    supplied them all (airbench's frozen whitening stem: recomputed from other data, its filters
    would no longer be the ones the pretrained layers after it were trained on)."""
    keys = getattr(model, "data_init_keys", ())
    return not_loaded is None or not keys or any(k in not_loaded for k in keys)


def _no_val_message(cfg: TrainConfig, origin: str, resume: str | None) -> str:
    """Why --early-stopping cannot run without val images, naming only settings the user gave."""
    head = (f"--early-stopping {cfg.early_stopping} watches the validation {cfg.metric if cfg.metric != 'auto' else 'metric'}, "
            f"but there are no validation images: {origin} has no val split")
    if resume is not None:  # the split is the run's own: a resume cannot change it
        recipe = cfg.recipe != "default"
        why = (f"--recipe {cfg.recipe} holds none out when the data has a test split" if recipe
               else f"it was started with --val-fraction {cfg.val_fraction:g}")
        return (f"{head} and run {resume} trains on all its training images ({why}). Resume without --early-stopping, "
                f"or start a new run with --early-stopping {cfg.early_stopping}{'' if recipe else ' --val-fraction 0.1'}")
    return (f"{head} and --val-fraction is {cfg.val_fraction:g}. Hold some out with --val-fraction 0.1 "
            "(or give the data a val split), or leave out --early-stopping")


def _write_config(run_dir: Path, text: str, resuming: bool) -> None:
    """Write run_dir/config.yaml; a run folder that cannot be written is said in one line, with what to do."""
    try:
        with atomic_write(run_dir / "config.yaml") as f:
            f.write(text)
    except OSError as e:
        if resuming and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise ImageRecError(f"cannot write {run_dir / 'config.yaml'}: {e.strerror}; the run folder must be writable "
                                f"to resume it (copy {run_dir} to a writable place and resume the copy)") from e
        raise ImageRecError(f"cannot write {run_dir / 'config.yaml'}: {write_error_text(e)}") from e


def _first_sentence(e: BaseException) -> str:
    """gloo's "[.../pair.cc:545] Read error [127.0.0.1]:24986: Connection reset by peer. This is
    typically ..." as "Read error [127.0.0.1]:24986: Connection reset by peer"."""
    line = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).splitlines() or [""])[0])
    return line.split(". ")[0][:200]


def _peer_lost(e: RuntimeError) -> bool:
    """Whether `e` is a collective failing because a peer process is gone (gloo raises plain
    RuntimeErrors from DDP's gradient hooks; newer torch raises DistError subclasses)."""
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(e)
    return isinstance(e, dist_error) or any(
        s in text for s in ("Connection reset by peer", "Connection closed by peer", "gloo", "NCCL", "Broken pipe"))


def train(
    cfg: TrainConfig | None = None,
    *,
    resume: str | None = None,
    callbacks: list[Callback] | None = None,
    console: Console | None = None,
    **overrides: Any,
) -> RunResult:
    """Train a classifier and write a run directory.

    Under torchrun (WORLD_SIZE > 1) this is one process of a data-parallel run: batch_size is per
    process, and rank 0 writes the run directory.

    Example:
        >>> from imagerec import train
        >>> result = train(data="mnist-mini", out="runs/mini", epochs=2)
        >>> result.metrics["test"]["accuracy"]
    """
    started = time.perf_counter()  # --time-limit counts from here, data loading included
    resume_meta = None
    if cfg is not None and not isinstance(cfg, TrainConfig):  # a dict of settings crashed in apply_overrides
        raise ImageRecError(f"train()'s first argument must be a TrainConfig, got {type(cfg).__name__}: pass a "
                            "mapping of settings as keyword arguments, train(**settings)")
    if resume is not None and cfg is not None:
        # The resume starts from the run's saved settings: a TrainConfig beside it was ignored whole.
        raise ImageRecError(f"train(resume={str(resume)!r}) continues that run with its saved settings, so the "
                            "TrainConfig given with it would be ignored: pass the settings to change as keyword "
                            f"arguments, e.g. train(resume={str(resume)!r}, epochs=20)")
    if resume is not None:
        resume_meta = read_checkpoint_meta(Path(resume) / "last")
        saved = TrainConfig(**resume_meta["train_config"])
        if "train_seconds" not in resume_meta["state"] and saved.schedule in ("onecycle", "triangle"):
            # Saved before --warmup-epochs reached these schedules (such checkpoints have no
            # train_seconds): that run warmed up as the schedule does by default, and keeps doing so.
            saved = replace(saved, warmup_epochs=None)
        saved = replace(saved, **legacy_mixing(saved, resume_meta))  # from before an explicit --mixup 0 meant off
        cfg = apply_overrides(saved, overrides, "--resume overrides")
        check_resume_overrides(saved, cfg, resume)
        cfg = replace(cfg, out=str(resume), data=saved.data)  # DATA as saved: the same data, checked above
        cfg = resume_epochs_cap(cfg, resume_meta, overrides, str(resume))
        if "time_limit" in overrides:
            log.warning("--time-limit plans a new run; --resume trains to the %d epoch(s) it planned "
                        "(raise --epochs to train further)", cfg.epochs)
    else:
        cfg = apply_overrides(cfg or TrainConfig(), overrides, "train() arguments")
    cfg.validate()
    if not cfg.data:
        raise ImageRecError("no DATA given: pass a folder, archive, manifest or dataset name")
    local = Path(cfg.data).expanduser()
    if resume is None and not cfg.data.startswith("store:") and local.exists():
        # A local path is read and saved absolute (config.yaml, checkpoints, data fingerprint), so
        # eval/export/robustness find the same data from any folder; names and store:NAME stay as given.
        cfg = replace(cfg, data=str(local.resolve()))
    with distributed.process_group(cfg.device) as device, contextlib.ExitStack() as held:  # held: the run's lock
        if resume_meta is not None:  # refused at once while another process trains into the run
            distributed.run_on_main(functools.partial(lock_for_resume, Path(cfg.out), resume_meta, held))
        else:  # a new run: the same refusals as when it claims the folder, before the data is read
            distributed.run_on_main(functools.partial(precheck_out, cfg.out))
        return _train(cfg, device, resume, resume_meta, callbacks, console, started, held)


def _train(cfg: TrainConfig, device: torch.device, resume: str | None, resume_meta: dict[str, Any] | None,
           callbacks: list[Callback] | None, console: Console | None, started: float,
           held: contextlib.ExitStack) -> RunResult:
    main, world = distributed.is_main(), distributed.world_size()
    console = console if main and console is not None else Console(stderr=True, soft_wrap=True, quiet=not main)
    threads = setup_compute(cfg.num_threads or distributed.default_threads())
    load = CpuLoadProbe() if device.type == "cpu" and main else None  # sampled while the data is read
    amp_dtype = resolve_precision(cfg.precision, device)
    sync_bn = distributed.check_sync_bn(cfg.sync_bn, device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    spec = read_data(cfg.data)
    if "train" not in spec.splits or not spec.splits["train"]:
        raise ImageRecError(f"{cfg.data}: no training images found")
    if resume_meta is not None:
        check_resume_classes(list(spec.class_names), list(resume_meta["preprocess"]["class_names"]), spec.origin, str(resume))
    if len(spec.class_names) < 2 and not spec.multi_label:
        for note in spec.notes:  # e.g. the images the layout ignored: often the reason
            log.warning(note)
        raise ImageRecError(single_class_message(spec))
    if resume_meta is None:
        channels, native = infer_geometry(spec)
        channels = cfg.channels or channels
        cfg = apply_recipe(cfg, channels, cfg.image_size or native, bool(spec.splits.get("test")))
        cfg.validate()
    spec = split_train_val(spec, cfg.val_fraction, cfg.seed)
    for note in spec.notes:
        log.warning(note)
    if cfg.early_stopping and not spec.splits.get("val"):
        raise ImageRecError(_no_val_message(cfg, spec.origin, resume))

    source_pre = source_preprocess(cfg.pretrained) if cfg.pretrained and resume_meta is None else None
    if source_pre is not None:
        # The weights learned on inputs prepared the source run's way: prepare these the same way
        # (mean/std below; ops and interpolation here, unless this run sets them).
        defaults = TrainConfig()
        adopt = {k: (list(source_pre[k]) if k == "ops" else source_pre[k]) for k in ("ops", "interpolation")
                 if k in source_pre and k not in cfg.explicit and getattr(cfg, k) == getattr(defaults, k)}
        if adopt.get("ops"):
            log.warning("--pretrained %s: applying its preprocessing ops %s, as its weights expect (give --op to choose others)",
                        cfg.pretrained, " ".join(adopt["ops"]))
        cfg = replace(cfg, **adopt)
    if resume_meta is not None:
        pre = PreprocessConfig.from_dict(resume_meta["preprocess"])
    else:
        size = cfg.image_size or (native if native <= 64 else 224)
        resize = size if size <= 64 else int(round(size / 0.875))
        pre = PreprocessConfig(size, channels, (0.5,) * channels, (0.5,) * channels, resize, tuple(spec.class_names),
                               cfg.interpolation, tuple(cfg.ops), spec.multi_label)
    train_items = limit_items(spec.splits["train"], cfg.limit_train, cfg.seed)
    counts = class_counts(train_items, pre.num_classes)
    warn_untrained_classes(counts, list(pre.class_names), cfg.limit_train)
    balance, metric = resolve_balance(cfg, counts, pre.multi_label)
    cfg = replace(cfg, balance=balance, metric=metric)
    weights = class_weights(counts, len(train_items), pre.multi_label) if balance != "none" else None
    if balance != "none":
        log.warning("class imbalance %.1f:1 -> balancing with %s; best checkpoint by val %s",
                    imbalance_ratio(counts), balance, metric)
    t_data = time.perf_counter()
    sampling = balance == "sampler" and not pre.multi_label
    train_loader = create_run_loader(spec, train_items, pre, cfg, train=True,
                                class_sampling=class_weights(counts, len(train_items), False, np.inf) if sampling else None)
    if train_loader.num_items == 0:
        raise ImageRecError(f"none of the {len(train_items)} training images of {spec.origin} could be read (the warnings above "
                            "say why for each); run `imagerec check` on the data")
    if train_loader.num_items < world:
        raise ImageRecError(f"{train_loader.num_items} training image(s) cannot be shared by {world} processes: "
                            "use more data or fewer processes (--nproc_per_node)")
    val_loader = create_run_loader(spec, spec.splits["val"], pre, cfg, train=False) if spec.splits.get("val") else None
    if val_loader is not None and not any_readable(val_loader):
        unreadable = unreadable_split_message(len(spec.splits["val"]), "val", spec.origin)
        if cfg.early_stopping:
            raise ImageRecError(f"--early-stopping {cfg.early_stopping} watches the validation images, but {unreadable}: "
                                "replace them (imagerec check DATA --fix quarantine DIR moves them out), "
                                "or leave out --early-stopping")
        # The trainer validates only when val images decode (its val_items): none is scored.
        log.warning("%s: training without validation, so the best checkpoint is the last epoch's", unreadable)
    if resume_meta is None:
        if source_pre is not None:
            mean, std = norm_for_channels(source_pre, pre.channels, str(cfg.pretrained))
        elif cfg.pretrained:
            mean, std = (IMAGENET_MEAN, IMAGENET_STD) if pre.channels == 3 else ((0.449,), (0.226,))
        else:
            mean, std = measure_mean_std(train_loader, pre.channels)
        # Rank 0's: a streaming loader samples only this rank's share of the images.
        pre = distributed.broadcast_object(replace(pre, mean=mean, std=std))
    data_seconds = time.perf_counter() - t_data

    model_name = cfg.model if cfg.model != "auto" else ("cnn" if pre.input_size <= 64 else "resnet18")
    lr, weight_decay = resolve_lr_wd(cfg)
    cfg = replace(cfg, model=model_name, lr=lr, weight_decay=weight_decay, **cfg.mixing())  # config.yaml records what trains
    model_kwargs: dict[str, Any] = {"in_chans": pre.channels, "img_size": pre.input_size}
    torch.manual_seed(mix_seed(cfg.seed, -1))  # weight init is part of the run's seed too
    model = create_model(model_name, num_classes=pre.num_classes, **model_kwargs)
    augment = BatchAugment(pre, cfg.augment, cfg.hflip, cfg.mixup, cfg.cutmix, cfg.translate, cfg.cutout)
    if hasattr(model, "match_training_flips"):  # e.g. airbench's eval TTA: mirror views only if training flipped
        model_kwargs["tta"] = model.match_training_flips(augment.flip)  # saved: eval/predict/export/serve use it
    not_loaded: set[str] | None = None  # state keys --pretrained did not supply (None: no --pretrained)
    if cfg.pretrained and resume_meta is None:
        report = load_pretrained(model, cfg.pretrained)
        not_loaded = set(report["missing"])
        log.info("pretrained weights from %s: %d tensors loaded", cfg.pretrained, report["loaded"])
    if resume_meta is None and hasattr(model, "init_from_data") and _needs_data_init(model, not_loaded):
        sample = uint8_sample(train_loader, pre.channels, 5000)
        model.init_from_data(normalize_batch(sample, pre.mean, pre.std))  # e.g. airbench's whitening stem
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same parameters, so same checkpoint keys
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(model, cfg, device)
    loss_weights = weights.to(device) if weights is not None and (balance == "weights" or pre.multi_label) else None
    if pre.multi_label and cfg.label_smoothing and "label_smoothing" in cfg.explicit:
        # BCE on label sets has no smoothing here: a given value would be recorded but never used
        log.warning("--label-smoothing %g is not used: it smooths single-label cross-entropy, and this data is "
                    "multi-label (binary cross-entropy per label); leave it out", cfg.label_smoothing)
    task = ClassificationTask(pre.multi_label, 0.0 if pre.multi_label else cfg.label_smoothing, loss_weights)
    pipeline = BatchPipeline(pre, device, cfg.channels_last, augment)

    # one directory, named (and, for a new run, created and locked) by rank 0
    run_dir = distributed.run_on_main(lambda: Path(cfg.out) if resume is not None else claim_run_dir(cfg.out, held))
    cfg = replace(cfg, out=str(run_dir))
    global_batch = train_loader.global_batch_size
    meta = {
        "model": model_name,
        "model_kwargs": model_kwargs,
        "num_params": count_parameters(model),
        "preprocess": pre.to_dict(),
        "train_config": cfg.to_dict(),
        "batch_mixing": {"mixup": cfg.mixup, "cutmix": cfg.cutmix},  # the alphas that ran (0 = off)
        # An explicit --epochs caps a --time-limit plan; the plan overwrites train_config's epochs.
        "epochs_cap": cfg.epochs if "epochs" in cfg.explicit else (resume_meta or {}).get("epochs_cap"),
        "versions": library_versions(),
        "distributed": {"world_size": world, "global_batch_size": global_batch},
        "data": {"origin": spec.origin, "fingerprint": spec.fingerprint(), "counts": spec.counts(),
                 "train_class_counts": dict(zip(spec.class_names, counts.tolist(), strict=True)),
                 "imbalance_ratio": round(imbalance_ratio(counts), 3)},
    }
    if main and resume_meta is not None and resume_meta["data"]["fingerprint"] != meta["data"]["fingerprint"]:
        log.warning(data_change_message(resume_meta["data"], meta["data"]))  # once, not once per process
    record_train_subset(meta["data"], resume_meta["data"] if resume_meta else None, train_items, cfg.limit_train)

    cbs: list[Callback] = [ProgressBar(console), HistoryCSV(run_dir / "history.csv")] if main else []
    if cfg.early_stopping:
        cbs.append(EarlyStopping(cfg.metric, cfg.early_stopping))
    deadline = plan_deadline(cfg.time_limit, started, resume_meta["state"] if resume_meta else None)
    trainer = Trainer(cfg, model, optimizer, task, train_loader, val_loader, pipeline, device, amp_dtype, run_dir, meta,
                      cbs + (callbacks or []), deadline)
    finished = False
    if resume_meta is None:
        trainer.state.planned = False if deadline is not None else None
    else:
        weights, state_tensors = load_checkpoint_tensors(Path(resume) / "last")
        model.load_state_dict(weights)
        restore_optimizer(optimizer, state_tensors, resume_meta)
        extra = {k.removeprefix("extra."): v for k, v in state_tensors.items() if k.startswith("extra.")}
        trainer.load_state(resume_meta["state"], extra)
        adapt_resume_to_world(trainer, resume_meta, len(train_loader))
        if trainer.state.stopped and cfg.epochs > int(resume_meta["train_config"]["epochs"]):
            trainer.state.stopped = ""  # --epochs raised: train on past the early stop
        finished = trainer.state.epoch >= cfg.epochs or bool(trainer.state.stopped)
        if finished:
            why = f"stopped early ({trainer.state.stopped})" if trainer.state.stopped else "already finished"
            console.print(f"{run_dir} {why} after {trainer.state.epoch} epoch(s); raise --epochs to train further",
                          markup=False, highlight=False)
            # Nothing to train: the run's record stays as it is, unless its final evaluation is missing or
            # older than its checkpoints (the run stopped during it): then that evaluation runs again.
            done = distributed.broadcast_object(recorded_metrics(run_dir, trainer.state.epoch) if main else None)
            if done is not None:
                return RunResult(run_dir, done if main else {}, model_name, main_process=main)
            console.print("its final evaluation is missing or older than its checkpoints: evaluating it again", highlight=False)
    if main and not finished:
        head = f"# torchrun: {world} processes x batch_size {cfg.batch_size} = global batch {global_batch}\n" if world > 1 else ""
        _write_config(run_dir, head + yaml.safe_dump(cfg.to_dict(), sort_keys=False), resume is not None)

    if load is not None and (advice := load.advice(threads)):
        log.warning(advice)
    console.print(
        f"training {model_name} ({meta['num_params']:,} params) on {spec.origin}: "
        f"{count_text(train_loader, train_loader.num_items)} train / {count_text(val_loader, trainer.val_items)} val images"
        f"{'' if counts_exact(train_loader, val_loader) else ' (listed: a streamed image that cannot be read is skipped when met)'}, "
        f"{pre.num_classes} classes, {pre.channels}x{pre.input_size}x{pre.input_size}, "
        f"{device.type} {str(amp_dtype).replace('torch.', '') if amp_dtype else 'fp32'}"
        f"{', data in RAM' if train_loader.cache is not None else ''}"
        f"{f', {world} processes x batch {cfg.batch_size} = global batch {global_batch}' if world > 1 else ''}",
        markup=False, highlight=False,  # the data's name or path as written: `[...]` in it is not markup
    )
    try:
        state = trainer.state if finished else trainer.fit()  # finished: evaluate only (if not recorded)
    except KeyboardInterrupt as e:
        if isinstance(e, StepStop):
            where = f"saved {run_dir}/last at epoch {trainer.state.epoch + 1}, step {trainer.state.epoch_step}"
        elif saved := _last_saved(run_dir):
            where = f"stopped at once, mid-step: {run_dir}/last is the checkpoint from before, {saved}"
        else:
            console.print(f"interrupted before the first checkpoint: nothing to resume in {run_dir}", markup=False, highlight=False)
            return RunResult(run_dir, {}, model_name, interrupted=True, main_process=main)
        console.print(f"interrupted: {where}; continue with: {_launcher(world)} train --resume {run_dir}",
                      markup=False, highlight=False)
        return RunResult(run_dir, {}, model_name, interrupted=True, main_process=main)
    except RuntimeError as e:
        if world == 1 or not _peer_lost(e):
            raise
        # A collective failed because another process of the run is gone (killed, out of memory):
        # one line with what survived, not gloo's traceback ("Connection reset by peer ... GLHF!").
        saved = _last_saved(run_dir)
        raise ImageRecError(
            f"another process of this {world}-process run stopped, so this one cannot go on "
            f"({_first_sentence(e)}); "
            + (f"{run_dir}/last is the checkpoint from {saved}; continue with: {_launcher(world)} train --resume {run_dir}"
               if saved else f"it stopped before the first checkpoint: nothing to resume in {run_dir}")
        ) from e
    train_seconds = state.train_seconds  # all segments of a resumed run (saved in the checkpoints)
    if trainer.stop_reason:
        console.print(trainer.stop_reason, markup=False, highlight=False)

    # Final evaluation with the best weights on every held-out split (rank 0 reads them; the
    # others get them from it, so no rank needs to see rank 0's disk).
    if main:
        model.load_state_dict(load_checkpoint_tensors(run_dir / "best")[0])
    distributed.broadcast_module(model)
    skipped = set(state.skipped) | set(train_loader.skipped.values()) | set(val_loader.skipped.values() if val_loader else [])
    metrics: dict[str, Any] = {
        "model": model_name,
        "best_epoch": state.best_epoch,
        "best_metric": {cfg.metric: state.best_metric},
        "epochs_run": state.epoch,
        "train_seconds": round(train_seconds, 2),
        "data_seconds": round(data_seconds, 2),
        "train_images": train_image_count(train_loader, state.skipped),
        "world_size": world,
        "global_batch_size": global_batch,
    }
    outputs: dict[Path, bytes] = {}
    for split in ("val", "test"):
        if spec.splits.get(split):
            loader = val_loader if split == "val" else create_run_loader(spec, spec.splits[split], pre, cfg, train=False)
            assert loader is not None
            if not any_readable(loader):  # nothing to score: said, and recorded, instead of a crash
                why = unreadable_split_message(len(spec.splits[split]), split, spec.origin)
                metrics.setdefault("not_evaluated", {})[split] = why
                skipped |= set(loader.skipped.values())
                console.print(f"{split}: not evaluated: {why}", markup=False, highlight=False)
                continue
            m = trainer.evaluate(loader)
            skipped |= set(loader.skipped.values())
            if main:
                outputs.update(eval_outputs(run_dir, split, m))
            metrics[split] = m
    metrics["skipped_files"] = sorted(set().union(*distributed.all_gather_object(skipped)))  # streamed shards differ
    if main:  # all written together, metrics.json last: --resume re-evaluates unless it names these checkpoints
        metrics["checkpoints"] = checkpoint_ids(run_dir)
        atomic_write_files({**outputs, run_dir / "metrics.json": json_text(metrics).encode()})
    if metrics["skipped_files"]:
        console.print(f"skipped {len(metrics['skipped_files'])} unreadable file(s); listed in {run_dir / 'metrics.json'}",
                      markup=False, highlight=False)
    return RunResult(run_dir, metrics, model_name, main_process=main)
