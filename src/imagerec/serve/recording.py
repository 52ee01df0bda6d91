"""Optional recording of predictions: a hook called off the request path with plain dict rows.

The hook is `settings.record_predictions(rows)`, or, when only `db` is set, the store's
`imagerec.store.record_predictions(store, model_id, rows)` on `imagerec.store.open_store(db)`, with
the served run directory as `model_id` (imported lazily; if the store cannot be imported or opened
the server logs a warning and serves without recording).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from imagerec.serve.settings import RecordHook, ServeSettings

log = logging.getLogger("imagerec.serve")
MAX_BACKLOG = 1000  # batches of rows waiting to be written; beyond this they are dropped, not queued


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
    def __init__(self, settings: ServeSettings) -> None:
        self.hook = settings.record_predictions
        if self.hook is None and settings.db:
            self.hook = _store_hook(settings.db)
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="record")
            if self.hook
            else None
        )
        self._backlog = 0
        self._lock = threading.Lock()
        self.dropped = 0

    @property
    def enabled(self) -> bool:
        return self.hook is not None

    def record(self, rows: list[dict[str, Any]]) -> None:
        if self._pool is None or not rows:
            return
        with self._lock:
            if self._backlog >= MAX_BACKLOG:
                self.dropped += len(rows)
                return
            self._backlog += 1
        self._pool.submit(self._write, rows)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        try:
            assert self.hook is not None
            self.hook(rows)
        except Exception:  # recording must never break serving
            log.exception("recording %d predictions failed", len(rows))
        finally:
            with self._lock:
                self._backlog -= 1

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=False)
