"""One loaded model version (`ModelEntry`): its predictor and batcher, the requests holding it, and
the model card clients see (no server paths)."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from imagerec.serve.batching import Batcher

log = logging.getLogger("imagerec.serve")


@dataclass
class ModelEntry:
    name: str
    version: str
    path: str
    predictor: Any
    batcher: Batcher
    metrics: dict[str, Any] = field(default_factory=dict)
    batching: dict[str, Any] = field(default_factory=dict)
    loaded_at: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")
    )
    # What was loaded: the run dir or bundle as resolved at load time (a symlink's target), which
    # recorded predictions are keyed by; the path as given where it is not a file system path.
    source: str = ""
    holders: Holders = field(default_factory=lambda: Holders())

    def __post_init__(self) -> None:
        if not self.source:
            self.source = resolved_source(self.path)

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.version)

    @property
    def weights(self) -> str | None:
        """What identifies the loaded weights: a run checkpoint's weights_id, a bundle's manifest_sha256
        (None for a custom loader's model)."""
        meta = getattr(self.predictor, "meta", None) or {}
        return meta.get("weights_id") or meta.get("manifest_sha256")

    def card(self, default: bool = False) -> dict[str, Any]:
        """What a client needs to know about this model version (no server paths)."""
        p = self.predictor
        pre = p.pre.to_dict() if hasattr(p.pre, "to_dict") else dict(vars(p.pre))
        pre.pop("class_names", None)
        meta = getattr(p, "meta", {}) or {}
        train = meta.get("train_config") or {}
        return {
            "name": self.name,
            "version": self.version,
            "default": default,
            "architecture": meta.get("model"),
            "classes": list(p.class_names),
            "num_classes": len(p.class_names),
            "multi_label": bool(pre.get("multi_label", False)),
            "preprocessing": pre,
            "metrics": self.metrics,
            "train": {
                **({"data": public_data_name(str(train["data"]))} if train.get("data") else {}),
                **{k: train[k] for k in ("epochs", "image_size", "augment") if k in train},
            },
            "num_params": meta.get("num_params"),
            "instances": len(self.batcher.instances),
            "batching": self.batching,
            "loaded_at": self.loaded_at,
        }


class Holders:
    """The requests holding one model version, and what to do once it is retired and none is left.

    Apart from ModelEntry so that the retirement keeps only the batcher alive, never the model."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._on_free: Callable[[], None] | None = None  # set by `retire`
        self._retired = False

    def hold(self) -> bool:
        """One more request uses the version; False once it is retired (pick another)."""
        with self._lock:
            if self._retired:
                return False
            self._count += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._count -= 1
            done = self._on_free if self._retired and self._count == 0 else None
        if done is not None:
            done()

    def retire(self, on_free: Callable[[], None]) -> None:
        """Take no more requests; call `on_free` once the ones holding it are done (now if none is)."""
        with self._lock:
            self._retired, self._on_free = True, on_free
            free = self._count == 0
        if free:
            on_free()


def resolved_source(path: str) -> str:
    """A model path as it is recorded: resolved when it exists (a run dir or bundle), else as given
    (a custom loader's name)."""
    try:
        p = Path(path).expanduser()
        return str(p.resolve()) if p.exists() else path
    except (OSError, RuntimeError, ValueError):
        return path


def public_data_name(data: str) -> str:
    """A run's DATA as a client may see it: a dataset name or store:NAME as given, a local path
    (saved absolute by `train`) by its last part only: the card holds no server paths."""
    if data.startswith("store:") or not any(sep in data for sep in ("/", "\\")):
        return data
    return re.split(r"[\\/]", data.rstrip("/\\"))[-1] or data


def read_eval_metrics(source: str) -> dict[str, Any]:
    """Scalar val/test metrics from a run's metrics.json ({} for a bundle without one)."""
    path = Path(source) / "metrics.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("cannot read %s; serving without evaluation metrics", path)
        return {}
    out: dict[str, Any] = {
        k: data[k] for k in ("best_epoch", "epochs_run", "train_images") if k in data
    }
    for split in ("val", "test"):
        if isinstance(data.get(split), dict):
            out[split] = {
                k: v
                for k, v in data[split].items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
    return out
