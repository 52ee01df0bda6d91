"""What is in the store: datasets with their counts, training runs, and predictions."""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from imagerec.store.db import Store
from imagerec.store.ingest import insert_ignoring_conflicts
from imagerec.store.schema import blobs, datasets, images, predictions, runs
from imagerec.utils import ImageRecError, sha256_file


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back naive datetimes; they were written as UTC
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat()


def list_datasets(store: Store) -> list[dict[str, Any]]:
    """Every dataset with its image counts: total, per split, per label, and per split and label.

    Example:
        >>> [(d["name"], d["splits"]) for d in list_datasets(store)]
        [('mnist-mini', {'train': 6000, 'test': 1000})]
    """
    with store.read() as conn:
        rows = conn.execute(sa.select(datasets).order_by(datasets.c.name)).all()
        counts = conn.execute(
            sa.select(images.c.dataset_id, images.c.split, images.c.labels, sa.func.count())
            .group_by(images.c.dataset_id, images.c.split, images.c.labels)
        ).all()
        sizes = dict(
            conn.execute(
                sa.select(images.c.dataset_id, sa.func.coalesce(sa.func.sum(blobs.c.size), 0))
                .join(blobs, blobs.c.sha256 == images.c.sha256)
                .group_by(images.c.dataset_id)
            ).all()
        )
    result = []
    for ds in rows:
        splits: dict[str, int] = {}
        labels: dict[str, int] = {}
        split_labels: dict[str, dict[str, int]] = {}
        for dataset_id, split, image_labels, n in counts:
            if dataset_id != ds.id:
                continue
            splits[split] = splits.get(split, 0) + n
            for label in image_labels:
                labels[label] = labels.get(label, 0) + n
                per = split_labels.setdefault(split, {})
                per[label] = per.get(label, 0) + n
        order = {c: k for k, c in enumerate(ds.class_names)}
        result.append(
            {
                "name": ds.name,
                "created_at": _iso(ds.created_at),
                "class_names": list(ds.class_names),
                "multi_label": bool(ds.multi_label),
                "images": sum(splits.values()),
                "bytes": int(sizes.get(ds.id, 0)),
                "splits": {s: splits[s] for s in sorted(splits, key=_split_key)},
                "labels": {c: labels[c] for c in sorted(labels, key=lambda c: order.get(c, len(order)))},
                "split_labels": {
                    s: {c: v[c] for c in sorted(v, key=lambda c: order.get(c, len(order)))}
                    for s, v in sorted(split_labels.items(), key=lambda kv: _split_key(kv[0]))
                },
            }
        )
    return result


def _split_key(split: str) -> tuple[int, str]:
    order = ("train", "val", "test")
    return (order.index(split) if split in order else 9, split)


def record_run(
    store: Store,
    run_dir: str | Path,
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    versions: Mapping[str, Any],
    status: str,
    *,
    name: str | None = None,
    started_at: datetime | None = None,
    finished_at: datetime | None = None,
    data_origin: str | None = None,
    data_fingerprint: str | None = None,
) -> int:
    """Record (or update, keyed by `run_dir`) a training run; return its id.

    Call it with status "running" at the start and again with "completed"/"failed" at the end:
    the second call updates the same row. `finished_at` defaults to now for any status but
    "running".

    Example:
        >>> run_id = record_run(store, "runs/exp1", cfg, {"test": {"accuracy": 0.98}}, {"torch": "2.4"}, "completed")
    """
    run_dir = str(Path(run_dir).expanduser().resolve())
    now = datetime.now(timezone.utc)
    update: dict[str, Any] = {
        "config": dict(config),
        "metrics": dict(metrics),
        "versions": dict(versions),
        "status": status,
        "finished_at": finished_at or (None if status == "running" else now),
    }
    given = {"name": name, "started_at": started_at, "data_origin": data_origin, "data_fingerprint": data_fingerprint}
    update |= {k: v for k, v in given.items() if v is not None}  # an update keeps what it is not given
    with store.write() as conn:
        conn.execute(
            insert_ignoring_conflicts(store, runs, "run_dir"),
            given | update | {"run_dir": run_dir, "name": name or Path(run_dir).name, "started_at": started_at or now},
        )
        conn.execute(sa.update(runs).where(runs.c.run_dir == run_dir).values(**update))
        return int(conn.execute(sa.select(runs.c.id).where(runs.c.run_dir == run_dir)).scalar_one())


def record_run_dir(store: Store, run_dir: str | Path, status: str | None) -> int:
    """Record a run directory written by `imagerec train` from its JSON files: settings, versions and
    data from last.json, metrics from metrics.json, and every eval-<split>.json under "evals".

    `status` None (an `imagerec eval` of the run) keeps the status and finish time the run was
    recorded with; a run not recorded yet is "completed" if it has metrics.json, else "interrupted".
    A run is recorded once it has ended, so its start time is read from its folder (see
    `_run_started_at`); a run recorded before keeps the start time it was recorded with (a resumed
    run started when its first segment did)."""
    import json

    d = Path(run_dir)
    finished_at = None
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(runs.c.status, runs.c.finished_at)
                           .where(runs.c.run_dir == str(d.expanduser().resolve()))).first()
    if status is None:
        status, finished_at = (row.status, row.finished_at) if row is not None else (
            "completed" if (d / "metrics.json").is_file() else "interrupted", None)
    started_at = _run_started_at(d) if row is None else None
    meta_path = d / "last.json"
    if not meta_path.is_file():
        raise ImageRecError(f"{d} is not a run directory (no last.json)")
    meta = json.loads(meta_path.read_text())
    metrics = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").is_file() else {}
    metrics.pop("skipped_files", None)
    evals = {}
    for f in sorted(d.glob("eval-*.json")):
        e = json.loads(f.read_text())
        evals[f.stem.removeprefix("eval-")] = {k: e[k] for k in ("accuracy", "top5", "loss", "macro_f1", "map", "data") if k in e}
    if evals:
        metrics["evals"] = evals
    data = meta.get("data", {})
    return record_run(store, d, meta.get("train_config", {}), metrics, meta.get("versions", {}), status,
                      name=d.name, started_at=started_at, finished_at=finished_at, data_origin=data.get("origin"),
                      data_fingerprint=data.get("fingerprint"))


def _run_started_at(run_dir: Path) -> datetime | None:
    """When the run in `run_dir` started: the time its first file was written (`imagerec train` writes
    config.yaml as training starts, once the data is read; every other file comes later). None when
    the folder holds no file, and the record then says now."""
    times = [f.stat().st_mtime for f in run_dir.iterdir() if f.is_file()] if run_dir.is_dir() else []
    return datetime.fromtimestamp(min(times), timezone.utc) if times else None


def _run_dict(row: sa.Row) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "run_dir": row.run_dir,
        "status": row.status,
        "started_at": _iso(row.started_at),
        "finished_at": _iso(row.finished_at),
        "data_origin": row.data_origin,
        "data_fingerprint": row.data_fingerprint,
        "config": row.config,
        "metrics": row.metrics,
        "versions": row.versions,
    }


def list_runs(store: Store) -> list[dict[str, Any]]:
    """Every recorded run, oldest first."""
    with store.read() as conn:
        return [_run_dict(r) for r in conn.execute(sa.select(runs).order_by(runs.c.id))]


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"test": {"accuracy": 0.9}} -> {"test.accuracy": 0.9}; lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name + "."))
        else:
            flat[name] = value
    return flat


def compare_runs(store: Store, ids: Iterable[int]) -> dict[str, Any]:
    """Metrics of several runs side by side: {"runs": [...], "metrics": {name: {run_id: value}}}.

    Nested metrics are flattened with dots ("test.accuracy"); a run without a metric has None.

    Example:
        >>> compare_runs(store, [1, 2])["metrics"]["test.accuracy"]
        {1: 0.97, 2: 0.98}
    """
    ids = list(dict.fromkeys(_run_id(i) for i in ids))
    if not ids:
        raise ImageRecError("compare_runs needs at least one run id (see: imagerec runs)")
    _check_run_ids(store, ids)
    with store.read() as conn:
        found = {r.id: r for r in conn.execute(sa.select(runs).where(runs.c.id.in_(ids)))}
    missing = [i for i in ids if i not in found]
    if missing:
        raise ImageRecError(
            f"no run with id {', '.join(map(str, missing))} in the store {store.display_url}; list them with: imagerec runs"
        )
    flat = {i: flatten_metrics(found[i].metrics or {}) for i in ids}
    names = sorted({k for f in flat.values() for k in f})
    return {
        "runs": [{k: v for k, v in _run_dict(found[i]).items() if k not in ("config", "metrics", "versions")} for i in ids],
        "metrics": {m: {i: flat[i].get(m) for i in ids} for m in names},
    }


def _run_id(value: Any) -> int:
    """A run id given as a whole number or its text ("12"); anything else (1.5, "abc", True) is one
    error naming it, not a bare ValueError nor a silently truncated id."""
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    if not isinstance(value, bool | str):
        try:
            return operator.index(value)  # int, numpy integers; not floats
        except TypeError:
            pass
    raise ImageRecError(f"run id {value!r} is not a whole number; list the runs and their ids with: imagerec runs")


def _check_run_ids(store: Store, ids: list[int]) -> None:
    """Refuse run ids that the store's `runs.id` column cannot hold (INTEGER: 32-bit on PostgreSQL,
    64-bit on SQLite) as missing ones are refused: no run can have them, and the database would
    fail on them (integer out of range) instead of saying so."""
    bits = 32 if store.dialect == "postgresql" else 64
    out = [i for i in ids if not -(2 ** (bits - 1)) <= i < 2 ** (bits - 1)]
    if out:
        raise ImageRecError(
            f"no run with id {', '.join(map(str, out))} in the store {store.display_url}; list them with: imagerec runs"
        )


REQUEST_ID_MAX = 32  # predictions.request_id is String(32): `imagerec serve` answers with uuid4().hex


def record_predictions(
    store: Store,
    model_id: str,
    rows: Iterable[Mapping[str, Any]],
    run_id: int | None = None,
    *,
    timeout_s: float | None = None,
) -> int:
    """Store prediction rows for model `model_id` (a run id, run dir or model name); return how many.

    Each row needs "topk" (any JSON, e.g. [{"label": "cat", "prob": 0.9}, ...]) and either the
    image's "sha256" or a "path" to hash; "created_at" (a datetime or ISO 8601 text; UTC when it
    has no offset) is when the prediction was made, else now. Optional: "served_as", the served
    model as "name@version", and "request_id", the id (at most 32 characters) of the HTTP answer
    that gave the prediction, as `imagerec serve --db` records them. `run_id` None: the run
    recorded with `model_id` as its run_dir (as `imagerec serve --db` passes it), if the store
    has one. `timeout_s`: fail, writing nothing, rather than wait longer than this for a lock
    (PostgreSQL: a lock timeout; SQLite: "database is locked"; see `Store.write`); the rows are
    written all or none either way.

    Example:
        >>> record_predictions(store, "runs/exp1", [{"path": "cat.jpg", "topk": [{"label": "cat", "prob": 0.93}]}])
        1
    """
    now = datetime.now(timezone.utc)
    model_id = model_key(model_id)
    values = []
    for n, row in enumerate(rows, 1):
        if "topk" not in row or not ("sha256" in row or "path" in row):
            raise ImageRecError(f"prediction row {n} needs 'topk' and 'sha256' or 'path'; got keys {sorted(row)}")
        sha = _sha256(row["sha256"], f"prediction row {n}") if row.get("sha256") else sha256_file(row["path"])
        created = _utc(row["created_at"], n) if row.get("created_at") is not None else now
        values.append(
            {"image_sha256": sha, "run_id": run_id, "model_id": model_id, "topk": row["topk"], "created_at": created,
             "served_as": _served_as(row.get("served_as"), n), "request_id": _request_id(row.get("request_id"), n)}
        )
    if values:
        with store.write(timeout_s) as conn:
            if run_id is None:
                found = conn.execute(sa.select(runs.c.id).where(runs.c.run_dir == model_id)).scalar()
                for v in values:
                    v["run_id"] = found
            conn.execute(sa.insert(predictions), values)
    return len(values)


def model_key(model_id: str | Path) -> str:
    """`model_id` as predictions are keyed by it: a run dir or bundle that exists, resolved (absolute,
    no trailing slash: as `record_run` keys runs by their run_dir and `imagerec serve --db` records the
    served folder), so "runs/exp1", "./runs/exp1/" and its absolute path are one key; anything else
    (a model name, a folder gone since) as given."""
    text = str(model_id)
    try:
        p = Path(text).expanduser()
        return str(p.resolve()) if text and p.exists() else text
    except (OSError, RuntimeError, ValueError):
        return text


_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def _sha256(value: Any, what: str) -> str:
    """A SHA-256 as the store keeps it: 64 lower-case hex digits (upper-case ones are the same hash)."""
    if isinstance(value, str) and _SHA256.fullmatch(value.strip()):
        return value.strip().lower()
    raise ImageRecError(f"{what}: sha256 must be 64 hex digits (as sha256sum prints them); got {_short(value)}")


def _served_as(value: Any, n: int) -> str | None:
    """A prediction row's served_as: None, or non-empty text ("name@version")."""
    if value is None or (isinstance(value, str) and value):
        return value
    raise ImageRecError(f"prediction row {n}: served_as must be text like 'mnist@2' (name@version); got {_short(value)}")


def _request_id(value: Any, n: int) -> str | None:
    """A prediction row's request_id: None, or text of 1 to REQUEST_ID_MAX characters (the column's
    size: PostgreSQL would refuse a longer one for the whole batch, SQLite would keep it whole)."""
    if value is None or (isinstance(value, str) and 0 < len(value) <= REQUEST_ID_MAX):
        return value
    raise ImageRecError(
        f"prediction row {n}: request_id must be text of 1 to {REQUEST_ID_MAX} characters (like the request_id "
        f"imagerec serve answers with); got {_short(value)}"
    )


def _short(value: Any) -> str:
    """repr(value), cut to a length an error line can hold."""
    text = repr(value)
    if len(text) <= 60:
        return text
    return f"{text[:50]}... ({len(value)} characters)" if isinstance(value, str) else f"{text[:57]}..."


def _utc(value: Any, n: int) -> datetime:
    """A prediction row's created_at as an aware UTC datetime (SQLite keeps no offset: UTC it is)."""
    parsed = value
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = None
    if not isinstance(parsed, datetime):
        raise ImageRecError(
            f"prediction row {n}: created_at must be a datetime or ISO 8601 text like 2025-01-31T12:00:00+00:00; got {value!r}"
        )
    return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)


def list_predictions(
    store: Store, sha256: str | None = None, model_id: str | None = None, request_id: str | None = None
) -> list[dict[str, Any]]:
    """Recorded predictions, oldest first, optionally only for one image (its sha256, either case),
    model (a run dir as given to record_predictions or served: relative, absolute, with or without a
    trailing slash) and/or HTTP request (the request_id `imagerec serve` answered with)."""
    query = sa.select(predictions).order_by(predictions.c.id)
    if sha256 is not None:
        query = query.where(predictions.c.image_sha256 == _sha256(sha256, "list_predictions"))
    if model_id is not None:  # keyed as record_predictions keys them: a run dir by its resolved path
        query = query.where(predictions.c.model_id == model_key(model_id))
    if request_id is not None:
        query = query.where(predictions.c.request_id == request_id)
    with store.read() as conn:
        return [
            {
                "id": r.id,
                "sha256": r.image_sha256,
                "run_id": r.run_id,
                "model_id": r.model_id,
                "topk": r.topk,
                "created_at": _iso(r.created_at),
                "served_as": r.served_as,
                "request_id": r.request_id,
            }
            for r in conn.execute(query)
        ]
