"""Optional recording of predictions: a hook called off the request path with plain dict rows.

The hook is `settings.record_predictions(rows)`, or, when only `db` is set, the store's
`imagerec.store.record_predictions(store, model_id, rows)` on `imagerec.store.open_store(db)`, with
the served run directory as `model_id` (imported lazily; if the store cannot be imported or opened
the server logs a warning and serves without recording).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from imagerec.serve.metrics import ServeMetrics
from imagerec.serve.settings import RecordHook, ServeSettings

log = logging.getLogger("imagerec.serve")
# Rows waiting to be written. The writer takes everything waiting in one go, so a store that stalls
# (a table lock, a backup) only lets rows pile up here: 100k rows are ~50 MB. Beyond that they are
# dropped, counted (imagerec_predictions_unrecorded_total) and logged, never queued without bound.
MAX_PENDING_ROWS = 100_000
WRITE_CHUNK = 5_000  # rows per hook call


def _store_hook(db: str) -> RecordHook | None:
    try:
        from imagerec.store import open_store, record_predictions  # type: ignore[attr-defined]

        store = open_store(db)
    except Exception as e:  # noqa: BLE001 - the store is optional: any failure only disables recording
        log.warning(
            "predictions will not be recorded: cannot use the store at %r (%s: %s)",
            db,
            type(e).__name__,
            e,
        )
        return None

    def hook(rows: list[dict[str, Any]]) -> None:
        by_model: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_model.setdefault(row["model_path"], []).append(row)
        for model_id, group in by_model.items():
            record_predictions(store, model_id, group)

    return hook


class Recorder:
    """Writes prediction rows off the request path, on one thread, in as few calls as it can."""

    def __init__(self, settings: ServeSettings, metrics: ServeMetrics | None = None) -> None:
        self.hook = settings.record_predictions
        if self.hook is None and settings.db:
            self.hook = _store_hook(settings.db)
        self.metrics = metrics
        self._rows: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._closing = False
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="record", daemon=True) if self.hook else None
        if self._thread is not None:
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self.hook is not None

    def record(self, rows: list[dict[str, Any]]) -> None:
        if self._thread is None or not rows:
            return
        with self._cond:
            if len(self._rows) + len(rows) <= MAX_PENDING_ROWS:
                self._rows.extend(rows)
                self._cond.notify()
                return
        self._drop(len(rows), f"{MAX_PENDING_ROWS} rows are already waiting for the store")

    def _drop(self, n: int, why: str) -> None:
        with self._cond:
            first = self.dropped == 0
            self.dropped += n
            total = self.dropped
        if self.metrics is not None:
            self.metrics.unrecorded.inc(n)
        if first or total // 10_000 != (total - n) // 10_000:  # the first drop, then every 10k rows
            log.warning("%d prediction(s) not recorded (%d so far): %s", n, total, why)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._rows and not self._closing:
                    self._cond.wait()
                if not self._rows:
                    return  # closing, and everything is written
                rows, self._rows = self._rows, []
            for i in range(0, len(rows), WRITE_CHUNK):
                self._write(rows[i : i + WRITE_CHUNK])

    def _write(self, rows: list[dict[str, Any]]) -> None:
        try:
            assert self.hook is not None
            self.hook(rows)
        except Exception as e:  # noqa: BLE001 - recording must never break serving
            log.debug("recording failed", exc_info=True)
            self._drop(len(rows), f"the store refused them ({type(e).__name__}: {e})")

    def close(self) -> None:
        """Write what is waiting, then stop (called at shutdown, after the last request)."""
        if self._thread is not None:
            with self._cond:
                self._closing = True
                self._cond.notify()
            self._thread.join()
