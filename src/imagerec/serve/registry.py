"""The loaded model versions, each with its own batcher, and the default one.

Readers never lock: the entries dict is replaced, never mutated (copy-on-write), and the default
is a single reference. A request picks the entry it will use once, at its start, and holds it
(`ModelRegistry.holding`) until it is answered, so switching the default, reloading or unloading a
version lets in-flight requests finish on the model they started with: a retired entry's batcher
stops only once the last request holding it is done, however long its body took to arrive.
"""

from __future__ import annotations

import functools
import gc
import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from imagerec.export.bundle import MANIFEST, load_bundle, preferred_runtime_entry, read_manifest
from imagerec.serve.batching import BatchCost, Batcher, adaptive_wait_ms, measure_batch_cost
from imagerec.serve.entries import ModelEntry, read_eval_metrics
from imagerec.serve.errors import ApiError
from imagerec.serve.metrics import ServeMetrics
from imagerec.serve.settings import NAME_RE, VERSION_RE, ModelSource, ServeSettings
from imagerec.utils import ImageRecError, available_cpus

log = logging.getLogger("imagerec.serve")


def default_instances(path: str, custom_loader: bool = False) -> int:
    """Model instances when the user did not say: two single-core instances of an exported bundle
    on 2+ cores served more images with a shorter tail than one instance with two threads (ONNX
    Runtime and OpenVINO threads are per session). A PyTorch run, or a bundle whose runtime is
    TorchScript, stays at one: PyTorch's thread count is process-wide, so copies would either
    change it for everything else in the process or each run on all cores at once."""
    if custom_loader or not (Path(path) / MANIFEST).is_file():
        return 1
    try:
        engine = preferred_runtime_entry(read_manifest(path))["engine"]
    except (ImageRecError, KeyError, TypeError, AttributeError):
        return 1  # a damaged manifest: loading it reports the problem
    return 1 if engine == "torchscript" else min(2, available_cpus())


def freeze_heap() -> None:
    """Collect garbage, then move every object alive now into the GC's permanent generation.

    A loaded server holds ~400k long-lived objects (torch, the runtimes, FastAPI); a full
    collection walks all of them, ~280 ms with the GIL held, and one landing in a request's life
    made the p99 latency 5-20x the median (README "Serving"). Frozen objects are skipped by every
    later collection (gc.freeze, as in CPython's docs for pre-fork servers). Called after each
    model load, reload and retirement: an unfreeze + collect first, so retired models' cycles are
    still freed.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _default_name(path: str) -> str:
    name = (
        re.sub(r"[^A-Za-z0-9._-]", "-", Path(path).resolve().name).strip("-._")
        or "model"
    )
    return name[:64]


class ModelRegistry:
    def __init__(self, settings: ServeSettings, metrics: ServeMetrics) -> None:
        self.settings, self.metrics = settings, metrics
        self._entries: dict[tuple[str, str], ModelEntry] = {}
        self._default: ModelEntry | None = None
        self._lock = threading.Lock()  # serialises writers only

    # --- reads (any thread, lock-free) ----------------------------------------------------------
    def default(self) -> ModelEntry:
        entry = self._default
        if entry is None:
            raise ApiError(
                503,
                "not_ready",
                "no model is loaded yet; retry shortly",
                {"Retry-After": "1"},
            )
        return entry

    def get(self, name: str, version: str) -> ModelEntry:
        entry = self._entries.get((name, version))
        if entry is None:
            have = ", ".join(f"{n}@{v}" for n, v in self._entries) or "none"
            raise ApiError(
                404,
                "model_not_found",
                f"no model '{name}' version '{version}' (loaded: {have}); see GET /v1/models",
            )
        return entry

    @contextmanager
    def holding(self, pick: Callable[[], ModelEntry]) -> Iterator[ModelEntry]:
        """The entry `pick` returns (e.g. `self.default`), held for the `with` block: a reload or
        unload retires it, but its batcher runs until every request holding it is done.

        An entry retired between `pick` and the hold is picked again: a retirement always follows
        the swap, so `pick` then finds its successor (or 404 for an unloaded version)."""
        while True:
            entry = pick()
            if entry.holders.hold():
                break
        try:
            yield entry
        finally:
            entry.holders.release()

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def cards(self) -> list[dict[str, Any]]:
        default = self._default
        return [e.card(default=e is default) for e in self._entries.values()]

    @property
    def ready(self) -> bool:
        d = self._default
        return d is not None and all(e.batcher.alive for e in self._entries.values())

    # --- writes (blocking: call from a worker thread) ---------------------------------------------
    def load_startup(self) -> None:
        """The command line's model versions, the first as the default. A source the command line
        gets wrong (a NAME@VERSION given twice, a bad version) is one ImageRecError naming it: the
        HTTP answer's words ("POST /v1/admin/reload") mean nothing to a server that never started."""
        for i, (spec, source) in enumerate(zip(self.settings.models, self.settings.sources, strict=True)):
            try:
                self.load(source, make_default=i == 0, freeze=False)
            except ApiError as e:
                if e.type == "version_exists":
                    raise ImageRecError(
                        f"model source '{spec}': {e.message.split(';')[0]} from an earlier source on the command "
                        "line; give each source its own NAME@VERSION=PATH"
                    ) from None
                raise ImageRecError(f"model source '{spec}': {e.message}") from None
        freeze_heap()  # once for all of them: each full collection of a loaded server is ~0.3 s

    def _load_instances(self, path: str) -> list[Any]:
        """`settings.instances` predictors for one model version, each warmed up by one call."""
        n = self.settings.instances or default_instances(path, custom_loader=self.settings.loader is not None)
        loader = self.settings.loader
        warmed_up = False  # whether each predictor has already run once
        if loader is None:
            from imagerec.predict import Predictor, load

            # The cores are shared out: n instances of cores/n threads each.
            threads = max(1, available_cpus() // n) if n > 1 else 0
            if (Path(path) / MANIFEST).is_file():
                bundle = load_bundle(path)  # files hashed once, not once per copy
                loader = functools.partial(Predictor.from_bundle, bundle, threads=threads)
                # Bundle.create_runtime ran one blank image through each copy (check_runtime_output):
                # the same call as the warm-up below, so a second one would only repeat it
                warmed_up = True
            else:
                loader = functools.partial(load, path, threads=threads)  # "model not found" checks
        else:
            loader = functools.partial(loader, path)
        predictors = [loader() for _ in range(n)]
        for predictor in predictors:
            if hasattr(predictor, "max_pixels"):
                # the model's own limit (its training --max-pixels) holds here as in eval and predict;
                # the server's --max-pixels caps it for uploads
                predictor.max_pixels = min(predictor.max_pixels, self.settings.max_pixels)
            if warmed_up:
                continue
            pre = predictor.pre
            # One warm-up call so the first request does not pay for lazy initialisation.
            predictor.predict_batch(
                torch.zeros(
                    (1, pre.channels, pre.input_size, pre.input_size), dtype=torch.uint8
                )
            )
        return predictors

    def _batch_wait(self, predictor: Any, label: str) -> tuple[float, BatchCost | None]:
        """How long a lone image waits for a batch to fill: `max_wait_ms`, or less where the
        model's measured cost says waiting cannot pay (batching.adaptive_wait_ms)."""
        s = self.settings
        if not s.adaptive_wait or s.max_batch < 2 or s.max_wait_ms <= 0:
            return s.max_wait_ms, None
        pre = predictor.pre
        image = torch.zeros((pre.channels, pre.input_size, pre.input_size), dtype=torch.uint8)
        cost = measure_batch_cost(predictor.predict_batch, image, n=min(4, s.max_batch))
        wait = adaptive_wait_ms(cost, s.max_wait_ms)
        log.info(
            "%s: a batch of 1 takes %.1f ms, each further image %.1f ms: waiting up to %.2f ms "
            "for a batch to fill (max-wait-ms %g)",
            label, 1000 * cost.batch1_s, 1000 * cost.per_image_s, wait, s.max_wait_ms,
        )
        return wait, cost

    def _create_entry(self, name: str, version: str, path: str) -> ModelEntry:
        predictors = self._load_instances(path)
        predictor = predictors[0]  # preprocessing, classes and the model card
        label = f"{name}@{version}"
        wait_ms, cost = self._batch_wait(predictor, label)
        batching: dict[str, Any] = {
            "max_batch": self.settings.max_batch,
            "wait_ms": round(wait_ms, 3),
            "max_wait_ms": self.settings.max_wait_ms,
            "adaptive": cost is not None,
        }
        if cost is not None:
            batching["measured"] = {
                "batch1_ms": round(1000 * cost.batch1_s, 3),
                "per_image_ms": round(1000 * cost.per_image_s, 3),
            }
        batch_hist, infer_hist = (
            self.metrics.batch_size.labels(label),
            self.metrics.inference.labels(label),
        )
        depth, images = (
            self.metrics.queue_depth.labels(label),
            self.metrics.images.labels(label),
        )

        def on_batch(n: int, seconds: float) -> None:
            batch_hist.observe(n)
            infer_hist.observe(seconds)
            images.inc(n)

        batcher = Batcher(
            [p.predict_batch for p in predictors],
            self.settings.max_batch,
            wait_ms,
            self.settings.queue_size,
            name=label,
            on_batch=on_batch,
            on_depth=depth.set,
            wait_for_incoming_only=cost is not None,
        ).start()
        return ModelEntry(
            name, version, path, predictor, batcher, read_eval_metrics(path), batching
        )

    def load(self, source: ModelSource, make_default: bool = False, freeze: bool = True,
             expect_weights: str | None = None) -> ModelEntry:
        """Load a new model version (its name/version default to the folder name and the next integer).
        `expect_weights`: the weights another worker loaded for it (ModelEntry.weights); a folder that
        now holds others (re-exported or retrained in place) is refused (409) rather than served under
        the same name@version."""
        name = source.name or _default_name(source.path)
        if not NAME_RE.fullmatch(name):
            raise ApiError(
                422, "invalid_name", f"model name '{name}' must match {NAME_RE.pattern}"
            )
        if source.version is not None and not VERSION_RE.fullmatch(source.version):
            raise ApiError(
                422,
                "invalid_version",
                f"model version '{source.version}' must match {VERSION_RE.pattern} (as in NAME@VERSION=PATH): "
                "a letter or digit, then up to 31 letters, digits, '.', '_' or '-'",
            )
        with self._lock:
            version = source.version or str(
                1
                + max(
                    (int(v) for n, v in self._entries if n == name and v.isdigit()),
                    default=0,
                )
            )
            if (name, version) in self._entries:
                raise ApiError(
                    409,
                    "version_exists",
                    f"model '{name}' version '{version}' is already loaded; use another version or POST /v1/admin/reload",
                )
            entry = self._create_entry(name, version, source.path)
            if expect_weights and entry.weights and entry.weights != expect_weights:
                _discard([entry])
                raise ApiError(409, "model_changed",
                               f"{source.path} now holds other weights than the {name}@{version} the other workers "
                               f"loaded from it ({str(entry.weights)[:12]}... instead of {expect_weights[:12]}...): it was "
                               "replaced in place; load the new weights as a new version instead")
            self._entries = {**self._entries, entry.key: entry}
            if make_default or self._default is None:
                self._default = entry
            if freeze:
                freeze_heap()
        log.info(
            "loaded model %s@%s from %s%s",
            name,
            version,
            source.path,
            " (default)" if self._default is entry else "",
        )
        return entry

    def set_default(self, name: str, version: str) -> ModelEntry:
        with self._lock:
            entry = self.get(name, version)
            self._default = (
                entry  # one reference swap: requests already running keep their entry
            )
        log.info("default model is now %s@%s", name, version)
        return entry

    def reload(
        self, name: str | None = None, version: str | None = None
    ) -> list[ModelEntry]:
        """Re-read the checkpoints of all versions (or one) and swap them in; old batchers drain and stop.

        All or nothing: every new version is loaded before any is swapped in. When one fails, the
        ones already loaded are dropped, every old version goes on serving, and a 422 names the
        version that failed."""
        fresh: list[ModelEntry] = []
        with self._lock:  # the targets too: a version unloaded meanwhile must not come back
            targets = (
                [self.get(name, version)]
                if name is not None and version is not None
                else self.entries()
            )
            for old in targets:
                try:
                    fresh.append(self._create_entry(old.name, old.version, old.path))
                except Exception as e:
                    _discard(fresh)  # in a function: no local of this frame keeps a model alive
                    freeze_heap()  # the discarded copies can be collected now
                    way_out = (  # else every later reload-all fails the same way
                        f"; to reload the others, unload it (DELETE /v1/admin/models/{old.name}/versions/"
                        f"{old.version}) or reload them one at a time (POST /v1/admin/reload with "
                        '{"name": ..., "version": ...})'
                        if len(targets) > 1 else ""
                    )
                    raise ApiError(
                        422,
                        "model_load_failed",
                        f"reload failed: {old.name}@{old.version} cannot be loaded ({type(e).__name__}: {e}"[:400]
                        + "); no model was reloaded: every version goes on serving as before" + way_out,
                    ) from e
            self._entries = {**self._entries, **{new.key: new for new in fresh}}
            by_key = {new.key: new for new in fresh}
            if self._default is not None and self._default.key in by_key:
                self._default = by_key[self._default.key]
            for old in targets:
                self._retire(old)
            freeze_heap()
        for new in fresh:
            log.info("reloaded model %s@%s from %s", new.name, new.version, new.path)
        return fresh

    def unload(self, name: str, version: str) -> ModelEntry:
        """Stop serving a version (not the default): new requests get 404 at once, the ones that
        picked it before finish on it, then its batcher stops and the model is freed."""
        with self._lock:
            entry = self.get(name, version)
            if entry is self._default:
                raise ApiError(
                    409,
                    "model_is_default",
                    f"{name}@{version} is the default model and cannot be unloaded; make another version "
                    "the default first (POST /v1/admin/default), then unload this one",
                )
            self._entries = {k: e for k, e in self._entries.items() if k != entry.key}
            self._retire(entry)
        log.info("unloaded model %s@%s (%s)", name, version, entry.path)
        return entry

    def _retire(self, entry: ModelEntry) -> None:
        """Stop a version that is no longer in the registry once no request holds it: requests that
        picked it before the swap may still be reading their body (up to body_timeout_s) and then
        decoding; what they queued is drained before the thread stops."""
        batcher = entry.batcher  # not the entry: the retirement must not keep the model alive

        def stop() -> None:
            batcher.stop(release=True)
            with self._lock:
                freeze_heap()  # the retired model's objects can be collected now

        def stop_in_background() -> None:  # called by the last request's thread: the event loop
            threading.Thread(target=stop, name=f"retire-{batcher.name}", daemon=True).start()

        entry.holders.retire(stop_in_background)

    def stop_all(self) -> None:
        for e in self._entries.values():
            e.batcher.stop(drain=False, timeout=5.0)


def _discard(entries: list[ModelEntry]) -> None:
    """Stop the batchers of entries that were never served, and forget them."""
    for entry in entries:
        entry.batcher.stop(drain=False, timeout=5.0, release=True)
    entries.clear()
