"""The one typed settings object behind `create_app` and `serve` (and `imagerec serve`)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from imagerec.utils import ImageRecError, did_you_mean

# A model source is "PATH", "NAME=PATH" or "NAME@VERSION=PATH". Names and versions are URL path
# segments (/v1/models/{name}/versions/{version}), so they hold no '/' or spaces.
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_VERSION = r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}"
_SPEC = re.compile(rf"^(?:(?P<name>{_NAME})(?:@(?P<version>{_VERSION}))?=)?(?P<path>.+)$")
NAME_RE = re.compile(_NAME)  # use with fullmatch: "$" would let a trailing newline through
VERSION_RE = re.compile(_VERSION)
# The numeric settings: each must be a finite number (nan and inf pass every comparison check).
_NUMBERS = (
    "port", "max_batch", "max_wait_ms", "queue_size", "instances", "workers", "max_inflight",
    "max_uploads", "body_timeout_s", "timeout_s", "retry_after_s", "max_body_mb", "max_files",
    "max_pixels", "max_top_k", "decode_workers",
)
RecordHook = Callable[[list[dict[str, Any]]], None]


@dataclass(frozen=True)
class ModelSource:
    """One model version to load: where from, and under which name/version it is served."""

    path: str
    name: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, spec: str) -> ModelSource:
        """PATH, NAME=PATH or NAME@VERSION=PATH. A whole spec that is an existing path (a folder named
        like "exp=1") is that path; one that reads both ways (the folder "a=run1", and "run1" exists
        too) is refused, naming both readings."""
        text = spec.strip()
        m = _SPEC.match(text)
        if not m:
            raise ImageRecError(
                f"bad model source '{spec}': use PATH, NAME=PATH or NAME@VERSION=PATH"
            )
        if m["name"] is not None and _exists(text):
            if _exists(m["path"]):
                raise ImageRecError(
                    f"model source '{text}' can be read two ways: as the folder {text}, or as {_reading(m)}; "
                    f"to serve the folder write {_dotted(text)} (or NAME={text}), to serve {m['path']} write "
                    f"{text[: m.start('path')]}{_dotted(m['path'])}"
                )
            return cls(text)
        return cls(m["path"], m["name"], m["version"])

    def check_exists(self, spec: str) -> None:
        """Refuse a NAME=PATH source whose PATH does not exist, saying how `spec` was read: the user
        may have meant a folder whose name holds '=' (run dirs and bundles only; a custom loader's
        names are its own)."""
        m = _SPEC.match(spec.strip())
        if self.name is not None and m is not None and not _exists(self.path):
            raise ImageRecError(
                f"model not found: {self.path} ('{spec.strip()}' was read as {_reading(m)}, and there is no "
                f"{self.path}; nor is there a folder named {spec.strip()}). Give a run directory written by "
                "'imagerec train' or a bundle folder written by 'imagerec export'"
            )


def _exists(path: str) -> bool:
    try:
        return Path(path).expanduser().exists()
    except (OSError, ValueError):
        return False


def _dotted(path: str) -> str:
    """A relative path written so that it cannot be read as NAME=PATH: ./path."""
    return path if Path(path).is_absolute() or path.startswith("./") else f"./{path}"


def _reading(m: re.Match[str]) -> str:
    """How a NAME[@VERSION]=PATH match was read, in words."""
    version = f", version '{m['version']}'" if m["version"] else ""
    return f"{'NAME@VERSION' if m['version'] else 'NAME'}=PATH (name '{m['name']}'{version}, path '{m['path']}')"


@dataclass(frozen=True)
class ServeSettings:
    """Everything the server needs; frozen, validated on creation.

    Example:
        >>> settings = ServeSettings(models=("runs/mnist",), max_batch=32, api_key_file="keys.txt")
        >>> app = create_app(settings)
    """

    models: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    # Micro-batching: a batch goes to the model when it holds `max_batch` images or when its
    # first image has waited `max_wait_ms`; at most `queue_size` images wait per model version.
    # adaptive_wait: wait only as long as the model's measured per-batch overhead, if that is less
    # than max_wait_ms (batching.adaptive_wait_ms), and only while another request is on its way
    # (batching.Batcher.incoming); False always waits the full max_wait_ms.
    max_batch: int = 32
    max_wait_ms: float = 5.0
    adaptive_wait: bool = True
    queue_size: int = 256
    # Model instances per version, each with its own inference thread and cores/instances
    # intra-op threads, all fed from the one queue. 0 (auto): 2 for an exported bundle on a
    # machine with 2 or more cores (measured: README "Serving"), else 1.
    instances: int = 0
    # Server processes sharing the port, each with its own models, batcher and event loop
    # (serve.workers); pinned to cores/workers cores each when that divides evenly.
    workers: int = 1
    # Requests being decoded or waiting for the model at once, counted from the moment their body
    # has arrived; beyond this the server answers 503 at once.
    max_inflight: int = 64
    # Requests whose body is still arriving, a separate (larger) cap: clients that upload slowly,
    # or send a few bytes and stall, take upload slots and never the prediction capacity above.
    # Beyond it: 503 at once. Bodies are held in memory, so the worst case is about
    # (max_inflight + max_uploads) * max_body_mb.
    max_uploads: int = 256
    # A body that has not fully arrived within body_timeout_s gets 408; once it has, decoding and
    # inference get timeout_s (then 504).
    body_timeout_s: float = 30.0
    timeout_s: float = 30.0
    retry_after_s: int = 1
    api_key_file: str | None = None
    max_body_mb: float = 20.0
    max_files: int = 16
    max_pixels: int = 40_000_000
    max_top_k: int = 100
    decode_workers: int = 0  # 0: one per available CPU
    cors_origins: tuple[str, ...] = ()
    # Folders the admin endpoint may load models from; empty: the folders holding `models`.
    model_dirs: tuple[str, ...] = ()
    db: str | None = None
    record_predictions: RecordHook | None = None
    # How a source path becomes a Predictor; None: `imagerec.predict.load` (run dirs and bundles).
    loader: Callable[[str], Any] | None = None
    log_level: str = "info"
    # HTTP parser: auto = httptools (C) with a head-size cap, h11 when httptools is missing;
    # h11 = always uvicorn's pure-Python parser (README "Serving" compares the two).
    http: str = "auto"
    # Set by the supervisor in each worker process (serve.workers.run_workers), not by users.
    worker_index: int = 0
    worker_count: int = 1
    worker_dir: str | None = None
    sources: tuple[ModelSource, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        if isinstance(self.models, str | Path):
            object.__setattr__(self, "models", (str(self.models),))
        object.__setattr__(self, "models", tuple(str(m) for m in self.models))
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        object.__setattr__(self, "model_dirs", tuple(str(d) for d in self.model_dirs))
        if not self.models:
            raise ImageRecError(
                "no model to serve: give at least one run directory or bundle"
            )
        object.__setattr__(
            self, "sources", tuple(ModelSource.parse(m) for m in self.models)
        )
        if self.loader is None:  # run dirs and bundles: a NAME=PATH whose PATH is missing says how it was read
            for spec, source in zip(self.models, self.sources, strict=True):
                source.check_exists(spec)
        for name in _NUMBERS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ImageRecError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ImageRecError(f"{name} must be a finite number, got {value}")
        for name in (
            "max_batch",
            "queue_size",
            "max_inflight",
            "max_uploads",
            "max_files",
            "max_pixels",
            "max_top_k",
            "retry_after_s",
            "workers",
        ):
            if int(getattr(self, name)) < 1:
                raise ImageRecError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_wait_ms", "instances"):
            if float(getattr(self, name)) < 0:
                raise ImageRecError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("timeout_s", "body_timeout_s", "max_body_mb"):
            if float(getattr(self, name)) <= 0:
                raise ImageRecError(f"{name} must be > 0, got {getattr(self, name)}")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise ImageRecError(
                f"port must be an integer from 0 to 65535 (0: any free port), got {self.port!r}"
            )
        if not isinstance(self.host, str) or not self.host.strip():
            raise ImageRecError(
                f"host must be an address or name to listen on (e.g. 127.0.0.1 or 0.0.0.0), got {self.host!r}"
            )
        if self.http not in ("auto", "h11"):
            raise ImageRecError(f"http must be 'auto' or 'h11', got {self.http!r}")
        if self.queue_size < self.max_files:
            raise ImageRecError(
                f"queue_size ({self.queue_size}) must be >= max_files ({self.max_files}), or a full request could never be queued"
            )
        if self.api_key_file is not None:
            check_key_file(self.api_key_file)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def allowed_model_dirs(self) -> tuple[Path, ...]:
        dirs = self.model_dirs or tuple(
            str(Path(s.path).resolve().parent) for s in self.sources
        )
        return tuple(dict.fromkeys(Path(d).resolve() for d in dirs))


def check_key_file(path: str) -> None:
    """Refuse an API key file that is missing, or not a file: say which (a folder is not "not found")."""
    p = Path(path)
    if p.is_file():
        return
    if p.is_dir():
        raise ImageRecError(f"API key file {path} is a directory, not a file: give the file inside it that holds "
                            "the keys (one key per line)")
    if p.exists():
        raise ImageRecError(f"API key file {path} is not a regular file: give a text file with one key per line")
    raise ImageRecError(f"API key file not found: {path} (one key per line)")


def create_settings(models: Sequence[str] | str, **kwargs: Any) -> ServeSettings:
    """ServeSettings from a list of sources and keyword overrides; unknown keys fail with a suggestion."""
    known = {f.name for f in fields(ServeSettings) if f.init}
    for key in kwargs:
        if key not in known:
            raise ImageRecError(
                f"unknown serve setting '{key}'.{did_you_mean(key, known)}"
            )
    return ServeSettings(
        models=(models,) if isinstance(models, str) else tuple(models), **kwargs
    )
