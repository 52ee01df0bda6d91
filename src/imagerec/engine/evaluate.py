"""`evaluate_run()`: a trained run on a split of any data source (the function behind `imagerec eval`)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from imagerec.config import PreprocessConfig, json_text
from imagerec.data import DataSpec, read_data, split_train_val
from imagerec.data.decode import DEFAULT_MAX_PIXELS, source_name
from imagerec.data.loader import ImageLoader, arrays_pass_through, targets_tensor
from imagerec.data.readers import SPLIT_ALIASES, Item, wrapper_prefix
from imagerec.engine.checkpoint import load_model
from imagerec.engine.pipeline import BatchPipeline, predict_logits
from imagerec.metrics import classification_metrics, multilabel_metrics
from imagerec.report import confusion_matrix_png
from imagerec.transforms import base_transform
from imagerec.utils import (
    ImageRecError,
    atomic_write_files,
    check_batch_size,
    resolve_device,
    resolve_precision,
    run_precision,
    setup_compute,
)

log = logging.getLogger("imagerec")


def eval_outputs(run_dir: Path, split: str, metrics: dict[str, Any]) -> dict[Path, bytes]:
    """The files one evaluation writes, rendered in memory: eval-<split>.json and (single-label)
    confusion-<split>.png. Written together (`atomic_write_files`), so a failed write never leaves
    one evaluation's JSON beside another's PNG."""
    files = {run_dir / f"eval-{split}.json": json_text(metrics).encode()}
    if "confusion_matrix" in metrics:
        files[run_dir / f"confusion-{split}.png"] = confusion_matrix_png(
            metrics["confusion_matrix"], list(metrics["per_class"]), title=f"{run_dir.name} - {split}")
    return files


def write_eval_outputs(run_dir: Path, split: str, metrics: dict[str, Any]) -> None:
    atomic_write_files(eval_outputs(run_dir, split, metrics))


def remap_items(spec: DataSpec, split: str, model_classes: list[str], multi_label: bool = True,
                model: str | Path = "the model") -> list[Item]:
    """The split's items with labels renumbered to the model's classes, matched by name. For a
    single-label model (`multi_label` False) every image must have one label: multi-label DATA whose
    images each have one is evaluated, one with several labels (or none) is refused, naming `model`."""
    index = {c: k for k, c in enumerate(model_classes)}
    unknown = [c for c in spec.class_names if c not in index]
    items = spec.splits[split]
    if not multi_label:
        if bad := next((it for it in items if isinstance(it.target, tuple) and len(set(it.target)) != 1), None):
            assert isinstance(bad.target, tuple)
            example = (f"images with several labels, e.g. '{';'.join(spec.class_names[k] for k in bad.target)}'"
                       if bad.target else f"images with no label, e.g. {source_name(bad.source)}")
            raise ImageRecError(f"{spec.origin} is multi-label ({example}), but {model} is a single-label model: "
                                f"give one label per image")
        items = [Item(it.source, it.target[0]) if isinstance(it.target, tuple) else it for it in items]
    used = {spec.class_names[t] for it in items for t in (it.target if isinstance(it.target, tuple) else (it.target,))}
    unknown = sorted(set(unknown) & used)
    if unknown:
        raise ImageRecError(
            f"{spec.origin} has classes the model was not trained on: {', '.join(unknown[:10])}. "
            f"The model knows: {', '.join(model_classes[:20])}"
        )
    def conv(t: int | tuple[int, ...]) -> int | tuple[int, ...]:
        return tuple(index[spec.class_names[k]] for k in t) if isinstance(t, tuple) else index[spec.class_names[t]]
    return [Item(it.source, conv(it.target)) for it in items]


def read_run_data(train_config: dict[str, Any], data: str | None, source: str | Path,
                  fingerprint: str | None = None) -> DataSpec:
    """`data`, or (without it) the data the run at `source` was trained on, with the run's own val
    carve-out (val_fraction, seed). Data used implicitly must match the checkpoint's `fingerprint`:
    other data at the saved path (a relative one read from another folder, say) is refused, never
    evaluated in its place."""
    where = data or train_config.get("data")
    if not where:
        raise ImageRecError(f"{source}: it does not say which data it was trained on; give the images as DATA")
    saved_relative = data is None and not where.startswith("store:") and not Path(where).expanduser().is_absolute()
    try:
        raw = read_data(where)
    except ImageRecError as e:
        if not saved_relative or Path(where).expanduser().exists():
            raise
        raise ImageRecError(
            f"{source} was trained on DATA '{where}', a path saved relative to the folder training ran in, and it is "
            f"not found from {Path.cwd()}: pass the data explicitly as DATA (or run from that folder)") from e
    spec = split_train_val(raw, train_config.get("val_fraction", 0.1), train_config.get("seed", 0))
    if data is None and fingerprint and spec.fingerprint() != fingerprint:
        rel = (f"; the run saved DATA as '{where}', relative to the folder training ran in, and from {Path.cwd()} "
               f"that is other data") if saved_relative else ""
        raise ImageRecError(
            f"{spec.origin} is not the data {source} was trained on: its fingerprint differs from the one in the "
            f"checkpoint (files added, removed, relabelled or other data){rel}. Pass the data to use explicitly as DATA")
    return spec


def split_folders(data: str) -> dict[str, str]:
    """The split folders (train/, val/, test/, ... empty or not) at the top of DATA, when DATA is a
    local folder (or a folder wrapping one folder): {split: folder name}. Empty for anything else."""
    root = Path(data).expanduser()
    if not root.is_dir():
        return {}
    for _ in range(2):  # DATA, or the one folder it wraps (`cifar10-jpg/` in `data/cifar10-jpg/train/...`)
        dirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
        found = {SPLIT_ALIASES[d.name.lower()]: d.name for d in dirs if d.name.lower() in SPLIT_ALIASES}
        if found or len(dirs) != 1:
            return found
        root = dirs[0]
    return {}


def archive_split_folders(files: list[str]) -> dict[str, str]:
    """The split folders holding files in an archive (`DataSpec.files`, every file member), below any
    wrapping folder: {split: folder name as written}."""
    paths = [PurePosixPath(f) for f in files]
    k = len(prefix := wrapper_prefix(paths))
    names = {p.parts[k] for p in paths if len(p.parts) > k + 1 and p.parts[:k] == prefix}
    return {SPLIT_ALIASES[n.lower()]: n for n in sorted(names) if n.lower() in SPLIT_ALIASES}


def no_test_reason(data: str, spec: DataSpec) -> str | None:
    """Why `data`, read as `spec` without test images, has none, when it names its splits (split
    folders in a folder or archive, a manifest's split column, IDX/CIFAR file names, the split every
    stored image has): then `test` is not all of it. None when it names no splits (a plain
    `<class>/<image>` folder or archive, a manifest without splits): all of it is held-out images."""
    folders = split_folders(data) or (archive_split_folders(spec.files) if spec.split_by == "folders" else {})
    if folders:
        return (f"its {folders['test']}/ folder holds no images" if "test" in folders
                else f"it has {', '.join(f + '/' for f in sorted(folders.values()))} but no test/ folder")
    if data.startswith("store:"):
        return "no image is stored in its test split"
    return {"folders": "it has split folders but no test/ folder",
            "manifest": "no row of its manifest has split test",
            "files": "it has no test files"}.get(spec.split_by)


def read_run_split(train_config: dict[str, Any], data: str | None, split: str | None, class_names: list[str],
                   source: str | Path, fingerprint: str | None = None,
                   multi_label: bool = True) -> tuple[DataSpec, list[Item], str]:
    """`split` of `data` (default: the data the run at `source` was trained on, checked against
    `fingerprint`), with the run's own val carve-out and labels renumbered to the model's classes
    (`remap_items`: a single-label model, `multi_label` False, needs one label per image), and the
    split's name. Split `all` is every image of the data. `split` None is `test`, except for DATA
    given explicitly without test images: that is evaluated whole (a plain `<class>/<image>` folder
    of held-out images), with a warning when DATA has split folders (train/ but no test images).
    `test` asked for explicitly of such DATA is refused: its train images are never evaluated in
    its place. Any DATA that names its splits counts (`no_test_reason`): folders, archives,
    manifests with a split column, IDX/CIFAR files and store datasets."""
    spec = read_run_data(train_config, data, source, fingerprint)
    if split in (None, "test") and data is not None and "test" not in spec.splits:
        why = no_test_reason(data, spec)
        if why:
            if split == "test":
                raise ImageRecError(
                    f"{spec.origin} has no 'test' split ({why}); it has: {', '.join(sorted(spec.splits))}. "
                    f"Use --split {' or --split '.join(sorted(spec.splits))}, or --split all (every image of it)")
            log.warning("%s has no test images (%s): evaluating all %d images of its %s split(s) instead, as split "
                        "'all'; choose one with --split", spec.origin, why,
                        sum(len(v) for v in spec.splits.values()), ", ".join(sorted(spec.splits)))
        split = "all"
    split = split or "test"
    if split == "all":
        spec = replace(spec, splits={"all": [it for s in sorted(spec.splits) for it in spec.splits[s]]})
    if split not in spec.splits:
        raise ImageRecError(f"{spec.origin} has no '{split}' split; it has: {', '.join(sorted(spec.splits))} "
                            f"(or use split 'all': every image of it)")
    if not spec.splits[split]:
        raise ImageRecError(f"the '{split}' split of {spec.origin} holds no images; it has: "
                            f"{', '.join(f'{k} {len(v)}' for k, v in sorted(spec.splits.items()))}: choose another split")
    return spec, remap_items(spec, split, class_names, multi_label, source), split


def normalize_split(split: str | None) -> str | None:
    """A split as typed ('VAL', 'validation', ' All ') as its name: case and spaces never matter,
    for `all` as for the split names."""
    if split is None:
        return None
    key = split.strip().lower()
    return "all" if key == "all" else SPLIT_ALIASES.get(key, split)


def unreadable_split_message(n: int, split: str, origin: str) -> str:
    """Why an evaluation has no numbers: every image of the split was skipped as unreadable."""
    return f"none of the {n} '{split}' images of {origin} could be read (all were skipped: see the warnings above)"


def non_finite_message(run_dir: str | Path, bad: int, n: int, split: str, amp: torch.dtype | None) -> str:
    """Why an evaluation has no numbers: the model's outputs are NaN or infinite."""
    if amp is not None:
        return (f"{run_dir}: the model's outputs on {bad} of {n} '{split}' images are NaN or infinite in "
                f"{str(amp).removeprefix('torch.')}: evaluate in full precision with --precision fp32")
    return (f"{run_dir}: the model's outputs on {bad} of {n} '{split}' images are NaN or infinite, in fp32: its "
            f"weights hold NaN or inf (training diverged: see history.csv); retrain, e.g. with a lower --lr or --grad-clip 1")


def create_eval_loader(spec: DataSpec, items: list[Item], pre: PreprocessConfig, batch_size: int = 256, workers: int = -1,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageLoader:
    """Batches of `items` through the model's own eval transform (the one used after training)."""
    return ImageLoader(items, spec.arrays, pre.channels, pre.input_size, base_transform(pre), batch_size,
                       targets_tensor(items, pre.num_classes, pre.multi_label), workers=workers,
                       max_pixels=max_pixels, fast_arrays=arrays_pass_through(pre, pre.input_size),
                       draft=pre.resize_size)


def evaluate_run(
    run_dir: str | Path,
    data: str | None = None,
    split: str | None = None,
    batch_size: int = 256,
    device: str = "auto",
    precision: str | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Evaluate a run's best checkpoint on `split` of `data` (default: the data it was trained on),
    in the run's own precision unless `precision` says otherwise, so `eval-<split>.json` has the
    numbers training's final evaluation gave. `split` None: test, or all of a `data` without test
    images (`read_run_split`).

    Example:
        >>> m = evaluate_run("runs/mnist", split="test")
        >>> m["accuracy"], m["macro_f1"]
    """
    split = normalize_split(split)  # 'VAL', 'validation', 'ALL'
    check_batch_size(batch_size)
    setup_compute()
    model, meta = load_model(run_dir)
    pre = PreprocessConfig.from_dict(meta["preprocess"])
    cfg = meta["train_config"]
    fingerprint = (meta.get("data") or {}).get("fingerprint")
    spec, items, split = read_run_split(cfg, data, split, list(pre.class_names), run_dir, fingerprint, pre.multi_label)
    for note in spec.notes:  # as train says them: e.g. image files of formats imagerec does not read
        log.warning(note)
    dev = resolve_device(device)
    amp = resolve_precision(precision or run_precision(cfg.get("precision"), dev), dev)
    model.to(dev).to(memory_format=torch.channels_last)
    loader = create_eval_loader(spec, items, pre, batch_size, max_pixels=cfg.get("max_pixels", DEFAULT_MAX_PIXELS))
    logits, targets, _ = predict_logits(model, loader, BatchPipeline(pre, dev, True), amp)
    if len(logits) == 0:
        raise ImageRecError(unreadable_split_message(len(items), split, spec.origin))
    if bad := int((~np.isfinite(logits).all(axis=1)).sum()):  # metrics of NaN are no numbers (a ValueError, before)
        raise ImageRecError(non_finite_message(run_dir, bad, len(logits), split, amp))
    if pre.multi_label:
        metrics = multilabel_metrics(logits, targets, list(pre.class_names))
    else:
        metrics = classification_metrics(logits, targets.astype(np.int64), list(pre.class_names))
    metrics["split"] = split
    metrics["data"] = spec.origin
    metrics["skipped_files"] = sorted(loader.skipped.values())
    if write:
        write_eval_outputs(Path(run_dir), split, metrics)
    return metrics
