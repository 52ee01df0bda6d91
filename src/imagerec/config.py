"""Typed configuration: the preprocessing contract that travels with a model, and training settings.

`PreprocessConfig` is frozen and saved in every checkpoint and export; it is the only source of
eval/predict/serve transforms. `TrainConfig` holds everything `imagerec train` accepts; a YAML file
may set any of its fields, and an unknown key fails with a "did you mean" suggestion.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from imagerec.data.decode import DEFAULT_MAX_PIXELS
from imagerec.utils import ImageRecError, atomic_write, did_you_mean

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
AUGMENT_PRESETS = ("none", "light", "standard", "strong")
OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad")
SCHEDULES = ("onecycle", "cosine", "constant", "triangle")
RECIPES = ("default", "fast")
METRICS = ("auto", "accuracy", "loss", "macro_f1", "balanced_accuracy", "map")
BALANCE = ("auto", "weights", "sampler", "none")


@dataclass(frozen=True)
class PreprocessConfig:
    """How a raw image becomes the model's input tensor, and what the outputs mean.

    Eval transform: decode -> EXIF orientation -> convert to `channels` -> resize shorter side to
    `resize_size` -> center crop `input_size` -> `ops` (on the cropped pixels) -> uint8 tensor;
    then, on the batch, scale to [0, 1] -> normalize(mean, std) (`transforms.base_transform`).
    """

    input_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_size: int
    class_names: tuple[str, ...]
    interpolation: str = "bilinear"
    ops: tuple[str, ...] = ()
    multi_label: bool = False

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ImageRecError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ImageRecError(f"mean/std need {self.channels} values each, got {self.mean} / {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ImageRecError(f"unknown interpolation '{self.interpolation}': use one of {', '.join(INTERPOLATIONS)}")
        if self.resize_size < self.input_size:
            raise ImageRecError(f"resize_size {self.resize_size} is smaller than input_size {self.input_size}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**kw)


@dataclass
class TrainConfig:
    """Every setting of a training run. Defaults are the fast, safe path on a CPU."""

    data: str = ""
    out: str = "runs/exp"
    recipe: str = "default"
    model: str = "auto"
    pretrained: str | None = None
    freeze_backbone: bool = False
    backbone_lr_scale: float = 1.0
    epochs: int = 10
    time_limit: float = 0.0  # minutes from the start of `train`; plans the epoch count (0 = off)
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float | None = None
    weight_decay: float | None = None
    momentum: float = 0.9
    norm_lr_scale: float = 1.0
    lookahead: bool = False
    schedule: str = "onecycle"
    warmup_epochs: float | None = None  # None: the schedule's own warm-up (engine/optim.py::create_schedule)
    label_smoothing: float = 0.1
    grad_clip: float = 0.0
    augment: str = "light"
    hflip: bool | None = None
    translate: int | None = None
    cutout: int = 0
    # None: the --augment preset's own (strong: 0.2 / 1.0, the others off); 0 turns it off. A run
    # records the alpha that ran (resolve_mixing).
    mixup: float | None = None
    cutmix: float | None = None
    image_size: int | None = None
    channels: int | None = None
    interpolation: str = "bilinear"
    ops: list[str] = field(default_factory=list)
    val_fraction: float = 0.1
    seed: int = 0
    deterministic: bool = False
    precision: str = "auto"
    device: str = "auto"
    channels_last: bool = True
    workers: int = -1
    cache: str = "auto"
    early_stopping: int = 0
    metric: str = "auto"
    balance: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    save_every_steps: int = 0
    num_threads: int = 0
    limit_train: int = 0
    sync_bn: bool = False  # under torchrun on CUDA: BatchNorm statistics over the global batch
    # Keys set through apply_overrides (command line, config file, train() arguments): a recipe
    # fills in only the others, so `--recipe fast --epochs 10` trains 10 epochs even though 10 is
    # also the default. Not a flag or a config key, and left out of to_dict (config.yaml), so a
    # run's config.yaml stays a valid --config file.
    explicit: list[str] = field(default_factory=list, metadata={"internal": True})

    def validate(self) -> None:
        """Check every setting; fields of the wrong type are coerced as config files and train()
        arguments are (`_coerce`: ops="median" -> ["median"], a pathlib.Path -> str) or refused."""
        for f in fields(self):
            if not f.metadata.get("internal"):
                setattr(self, f.name, _coerce(f.name, getattr(self, f.name), f.default, str(f.type), "TrainConfig"))
        checks = [
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("recipe", self.recipe, RECIPES),
            ("schedule", self.schedule, SCHEDULES),
            ("augment", self.augment, AUGMENT_PRESETS),
            ("metric", self.metric, METRICS),
            ("interpolation", self.interpolation, INTERPOLATIONS),
            ("cache", self.cache, ("auto", "ram", "none")),
            ("balance", self.balance, BALANCE),
        ]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ImageRecError(
                    f"unknown {name} '{value}': use one of {', '.join(allowed)}.{did_you_mean(value, allowed)}"
                )
        positive = {"epochs": self.epochs, "batch_size": self.batch_size}
        for name, value in positive.items():
            if value < 1:
                raise ImageRecError(f"{name} must be at least 1, got {value}")
        if not 0.0 <= self.time_limit <= 60 * 24 * 366:
            raise ImageRecError(f"time_limit is in minutes and must be between 0 (off) and a year, got {self.time_limit}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ImageRecError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ImageRecError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise ImageRecError(f"lr must be a finite positive number, got {self.lr}")
        if self.image_size is not None and not 8 <= self.image_size <= 1024:
            raise ImageRecError(f"image_size must be between 8 and 1024, got {self.image_size}")
        if self.translate is not None and not 0 <= self.translate <= 64:
            raise ImageRecError(f"translate must be between 0 and 64 pixels, got {self.translate}")
        # a square of the input's size or more blanks the whole image; the input size is checked
        # against once known (transforms.check_cutout)
        top = (self.image_size or 1024) - 1
        if not 0 <= self.cutout <= top:
            where = f"--image-size {self.image_size}" if self.image_size else "the largest --image-size, 1024"
            raise ImageRecError(f"cutout is a square's side in pixels and must be between 0 (off) and {top} "
                                f"(less than {where}), got {self.cutout}")
        if not 0 < self.norm_lr_scale < math.inf:  # NaN fails this too
            raise ImageRecError(f"norm_lr_scale must be a finite number > 0, got {self.norm_lr_scale}")
        at_least_zero = {"seed": self.seed, "early_stopping": self.early_stopping, "grad_clip": self.grad_clip,
                         "mixup": self.mixup or 0.0, "cutmix": self.cutmix or 0.0,
                         "warmup_epochs": 0.0 if self.warmup_epochs is None else self.warmup_epochs,
                         "save_every_steps": self.save_every_steps, "num_threads": self.num_threads,
                         "backbone_lr_scale": self.backbone_lr_scale,
                         "weight_decay": 0.0 if self.weight_decay is None else self.weight_decay}
        for name, value in at_least_zero.items():
            if not (0 <= value < math.inf):  # NaN fails this too
                raise ImageRecError(f"{name} must be a finite number >= 0, got {value}")
        # what the seed mixer (8 signed bytes) and torch's thread count (a C int) can hold
        for name, value, top, shown in (("seed", self.seed, 2**63 - 1, "2**63-1"),
                                        ("num_threads", self.num_threads, 2**31 - 1, "2**31-1")):
            if not 0 <= value <= top:
                raise ImageRecError(f"{name} must be between 0 and {shown}, got {value}")
        if not 0.0 <= self.momentum < 1.0:
            raise ImageRecError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.workers < -1:
            raise ImageRecError(f"workers is a number of loader processes (0 = none, -1 = auto), got {self.workers}")
        if self.limit_train < 0:
            raise ImageRecError(f"limit_train is a number of training images, 0 for all; got {self.limit_train}")
        if self.max_pixels < 1:
            raise ImageRecError(f"max_pixels must be at least 1, got {self.max_pixels}")
        if self.channels is not None and self.channels not in (1, 3):
            raise ImageRecError(f"channels must be 1 or 3, got {self.channels}")

    def to_dict(self) -> dict[str, Any]:
        internal = {f.name for f in fields(self) if f.metadata.get("internal")}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in internal}

    def mixing(self) -> dict[str, float]:
        """{"mixup": alpha, "cutmix": alpha} as they run (`resolve_mixing`), for a run to record."""
        mixup, cutmix = resolve_mixing(self.augment, self.mixup, self.cutmix)
        return {"mixup": mixup, "cutmix": cutmix}


def resolve_mixing(augment: str, mixup: float | None, cutmix: float | None) -> tuple[float, float]:
    """The (mixup, cutmix) alphas that run: an unset one (None) is the --augment preset's own
    (strong: 0.2 and 1.0, the others: off); a given one, 0 included, is used as given (0 = off)."""
    strong = augment == "strong"
    return (0.2 if strong else 0.0) if mixup is None else mixup, (1.0 if strong else 0.0) if cutmix is None else cutmix


def legacy_mixing(saved: TrainConfig, meta: dict[str, Any]) -> dict[str, float]:
    """For the resume of a checkpoint written before an explicit --mixup/--cutmix 0 meant off (it has
    no `batch_mixing`): the alphas that run trained with, so it goes on mixing as it did. `strong`
    took a 0 for unset (0.2 / 1.0), and multi-label data was never mixed. {} for newer checkpoints."""
    if "batch_mixing" in meta:
        return {}
    mixup, cutmix = saved.mixup or 0.0, saved.cutmix or 0.0
    if meta.get("preprocess", {}).get("multi_label"):
        mixup, cutmix = 0.0, 0.0
    elif saved.augment == "strong":
        mixup, cutmix = mixup or 0.2, cutmix or 1.0
    return {"mixup": mixup, "cutmix": cutmix}


_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|sec|m|min|h|hr)?\s*", re.IGNORECASE)
_UNIT_MINUTES = {"s": 1 / 60, "sec": 1 / 60, "m": 1.0, "min": 1.0, "h": 60.0, "hr": 60.0}


def parse_minutes(value: Any) -> float:
    """A duration in minutes from a number (minutes) or a string with a unit: '20', '20m', '90s', '1.5h'."""
    if isinstance(value, bool):
        raise ImageRecError(f"time_limit must be a duration, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    m = _DURATION.fullmatch(str(value))
    if m is None:
        raise ImageRecError(f"time_limit={value!r} is not a duration: give minutes (20) or a number with a unit, "
                            "e.g. 90s, 20m, 1.5h")
    return float(m.group(1)) * _UNIT_MINUTES[(m.group(2) or "m").lower()]


def format_minutes(minutes: float) -> str:
    """'10 s' for a duration under a minute, else '20 min' (as --time-limit is shown)."""
    return f"{minutes * 60:.3g} s" if minutes < 1 else f"{minutes:g} min"


# TrainConfig fields that name a file or folder: an os.PathLike (pathlib.Path) is taken as its path
PATH_FIELDS = ("data", "out", "pretrained")


def _setting_label(name: str, origin: str) -> str:
    """How a setting is named to the user, after where its value came from: "--epochs (epochs)" on the
    command line, "train() argument 'epochs'", "TrainConfig field 'epochs'", or a config file's key."""
    if origin == "the command line":
        return f"--{name.replace('_', '-')} ({name})"
    if origin == "train() arguments":
        return f"train() argument '{name}'"
    if origin == "--resume overrides":
        return f"--resume override '{name}'"
    if origin == "TrainConfig":
        return f"TrainConfig field '{name}'"
    return f"{origin}: config key '{name}'"


def _coerce(name: str, value: Any, default: Any, annotation: str, origin: str = "a config file") -> Any:
    """Check a value against the field's type (annotation as a string); YAML already parsed numbers
    and booleans. Python callers may pass any os.PathLike for a path, any number type (numpy scalars
    included, bool excepted) for a number and any sequence but a string for a list."""
    label = _setting_label(name, origin)
    if name == "time_limit" and value is not None:
        return parse_minutes(value)
    if value is None:
        if "None" in annotation:
            return None
        raise ImageRecError(f"{label} cannot be empty")
    if "list" in annotation:
        if isinstance(value, str):
            return [value]
        if isinstance(value, (bytes, Mapping)) or not isinstance(value, Sequence):
            raise ImageRecError(f"{label} must be a list of strings (or one string), got {value!r}")
        return [str(v) for v in value]
    if "bool" in annotation:
        if not isinstance(value, bool):
            raise ImageRecError(f"{label} must be true or false, got {value!r}")
        return value
    if "float" in annotation:
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads 1e-3 and 5e-4, without a dot, as strings.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ImageRecError(f"{label} must be a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if "int" in annotation:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ImageRecError(f"{label} must be an integer, got {value!r} ({type(value).__name__})")
        return int(value)
    if name in PATH_FIELDS and isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        what = "a path (a string or pathlib.Path)" if name in PATH_FIELDS else "a string"
        raise ImageRecError(f"{label} must be {what}, got {value!r} ({type(value).__name__})")
    return value


# train flags that are not keys of a --config file, and the environment variable that also sets each
COMMAND_LINE_ONLY = {"db": "IMAGEREC_DB", "data_dir": "IMAGEREC_DATA"}


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any], origin: str) -> TrainConfig:
    """Return `cfg` with `overrides` applied; unknown keys fail with a suggestion."""
    by_name = {f.name: f for f in fields(TrainConfig) if not f.metadata.get("internal")}
    updates = {}
    for key, value in overrides.items():
        norm = str(key).replace("-", "_")
        if norm in COMMAND_LINE_ONLY:  # where things are, not how to train: not saved with the run
            raise ImageRecError(f"'{key}' in {origin} is not a training setting: give it on the command line "
                                f"(--{norm.replace('_', '-')} ...) or as ${COMMAND_LINE_ONLY[norm]}")
        if norm not in by_name:
            raise ImageRecError(f"unknown config key '{key}' in {origin}.{did_you_mean(norm, by_name)}")
        f = by_name[norm]
        updates[norm] = _coerce(norm, value, f.default, str(f.type), origin)
    return dataclasses.replace(cfg, **updates, explicit=sorted({*cfg.explicit, *updates}))


class _DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one mapping of a config file."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is refused: PyYAML keeps the last
    one without a word, so a copy-pasted `epochs: 2` below `epochs: 1` silently won. `batch-size`
    and `batch_size` are one key here, as they are to `apply_overrides`."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[object, tuple[object, int]] = {}  # key, '-' as '_' -> (key as written, line)
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` keys may be overridden, by design
            continue
        key = loader.construct_object(key_node, deep=deep)
        norm = key.replace("-", "_") if isinstance(key, str) else key
        line = key_node.start_mark.line + 1
        try:
            first = seen.get(norm)
        except TypeError:  # an unhashable key: construct_mapping says so
            continue
        if first is None:
            seen[norm] = (key, line)
            continue
        where = f"twice on line {line}" if first[1] == line else f"on lines {first[1]} and {line}"
        what = f"key '{key}' is given" if first[0] == key else f"keys '{first[0]}' and '{key}' (one setting) are given"
        raise _DuplicateKeyError(f"{what} {where}; keep one of them")
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_config_file(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    """Read a YAML (or JSON) file of TrainConfig keys on top of `base`; a key given twice is refused."""
    p = Path(path)
    if not p.is_file():
        raise ImageRecError(f"config file not found: {p}")
    try:
        raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError as e:
        raise ImageRecError(f"config file {p} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at {e.start}); save it as UTF-8") from e
    except _DuplicateKeyError as e:
        raise ImageRecError(f"config file {p}: {e}") from e
    except yaml.YAMLError as e:
        raise ImageRecError(f"config file {p} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ImageRecError(f"config file {p} must hold a mapping of keys to values, got {type(raw).__name__}")
    return apply_overrides(base or TrainConfig(), raw, str(p))


def json_text(obj: Any) -> str:
    """The JSON text imagerec writes for records (indented; anything else as str)."""
    return json.dumps(obj, indent=2, default=str) + "\n"


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically: a crash mid-write never leaves a truncated file behind."""
    with atomic_write(path) as f:
        f.write(json_text(obj))
