"""The library side of the store's CLI subcommands: each opens the store, calls one function, prints.

Each returns the process exit code; errors a user can fix are raised as ImageRecError (the CLI
prints them as one line). Names, paths, classes and URLs are printed as written: `[...]` in them
is never read as Rich markup (a run `cnn[lr=0.1]` is not listed as `cnn`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.text import Text

from imagerec.store.catalog import compare_runs, list_datasets, list_runs
from imagerec.store.db import open_store
from imagerec.store.export import export_dataset
from imagerec.store.ingest import ingest
from imagerec.utils import ImageRecError

FORMATS = ("table", "json")
MAX_SKIPPED_SHOWN = 10
SUMMARY_METRICS = ("val.accuracy", "test.accuracy", "test.macro_f1", "test.loss")


def _console() -> Any:
    from rich.console import Console

    console = Console(soft_wrap=True)
    if not console.is_terminal:  # piped output: do not squeeze tables into 80 columns
        console = Console(soft_wrap=True, width=160)
    return console


def _plain(value: Any) -> Text:
    """A table cell or title as plain text: store values come from users and data, never markup."""
    return Text(str(value))


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ImageRecError(f"unknown format '{fmt}': use table or json")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def ingest_command(
    source: str, dataset: str, split: str | None = None, db: str | None = None, update: bool = False,
    data_dir: str | None = None, max_pixels: int | None = None,
) -> int:
    """`imagerec ingest SOURCE --dataset NAME [--split S] [--update] [--db URL] [--data-dir DIR]`: 0, or 1
    when no image was readable. `max_pixels`: the pixel limit (None: the default, as `ingest`)."""
    with open_store(db) as store:
        report = ingest(store, source, dataset, split=split, progress=True, update=update, data_dir=data_dir,
                        max_pixels=max_pixels)
        console = _console()
        console.print(report.summary(), highlight=False, markup=False)
        for note in report.notes:
            console.print(f"  left out: {note}", highlight=False, markup=False)
        for _name, reason in report.skipped[:MAX_SKIPPED_SHOWN]:  # reason names the file
            console.print(f"  skipped {reason}", highlight=False, markup=False)
        if len(report.skipped) > MAX_SKIPPED_SHOWN:
            console.print(f"  ... and {len(report.skipped) - MAX_SKIPPED_SHOWN} more unreadable file(s)")
        for line in report.conflict_lines(MAX_SKIPPED_SHOWN):
            console.print(line, highlight=False, markup=False)
        if report.readable:
            also = f" --db {db}" if db else ""  # a --db store is not the default one
            console.print(f"store: {store.display_url}; train on it with: imagerec train store:{dataset}{also}",
                          highlight=False, markup=False)
        else:
            console.print(f"nothing stored: dataset '{dataset}' was not created or changed", highlight=False, markup=False)
    return 1 if report.seen and not report.readable else 0


def datasets_command(db: str | None = None, fmt: str = "table") -> int:
    """`imagerec datasets [--db URL] [--format table|json]`: the datasets with counts per split and label."""
    _check_format(fmt)
    with open_store(db) as store:
        rows = list_datasets(store)
        where = store.display_url
    if fmt == "json":
        print(json.dumps({"store": where, "datasets": rows}))
        return 0
    from rich.table import Table

    table = Table(title=Text(f"datasets in {where}", style="table.title"))
    for col in ("name", "images", "train", "val", "test", "classes", "multi", "size", "created", "images per label"):
        table.add_column(col, justify="right" if col in ("images", "train", "val", "test", "classes", "size") else "left",
                         no_wrap=col == "name")
    for d in rows:
        table.add_row(
            _plain(d["name"]),
            str(d["images"]),
            *(str(d["splits"].get(s, "")) for s in ("train", "val", "test")),
            str(len(d["class_names"])),
            "yes" if d["multi_label"] else "no",
            _size(d["bytes"]),
            (d["created_at"] or "")[:10],
            _plain(_label_counts(d["labels"])),
        )
    console = _console()
    console.print(table)
    if not rows:
        console.print("no datasets yet: add one with imagerec ingest DATA --dataset NAME")
    return 0


def _label_counts(labels: dict[str, int], shown: int = 8) -> str:
    """`cat 120, dog 98, ...`: the first `shown` labels in class order (all of them: --format json)."""
    text = ", ".join(f"{name} {n}" for name, n in list(labels.items())[:shown])
    return text + (f", ... ({len(labels) - shown} more: --format json)" if len(labels) > shown else "")


def runs_command(db: str | None = None, fmt: str = "table", compare: list[int] | None = None) -> int:
    """`imagerec runs [--db URL] [--format table|json] [--compare ID ID ...]`."""
    _check_format(fmt)
    with open_store(db) as store:
        result: Any = compare_runs(store, compare) if compare else list_runs(store)
    if fmt == "json":
        print(json.dumps(result if compare else {"runs": result}))
        return 0
    from rich.table import Table

    if compare:
        table = Table(title="runs compared")
        table.add_column("metric")
        for run in result["runs"]:
            table.add_column(_plain(f"{run['id']}: {run['name']}"), justify="right")
        for metric, values in result["metrics"].items():
            if all(isinstance(v, (int, float, str, type(None))) for v in values.values()):
                table.add_row(_plain(metric), *(_plain(_cell(values[r["id"]])) for r in result["runs"]))
    else:
        table = Table(title="runs")
        for col in ("id", "name", "status", "started", "model", "data", "epochs") + SUMMARY_METRICS:
            table.add_column(col, no_wrap=col in ("id", "status", "started"), justify="right" if "." in col else "left")
        for run in result:
            flat = _flat(run["metrics"])
            model = (run["metrics"] or {}).get("model") or (run.get("config") or {}).get("model", "")
            table.add_row(
                str(run["id"]), _plain(run["name"]), _plain(run["status"]), (run["started_at"] or "")[:16].replace("T", " "),
                _plain(model), _plain(run["data_origin"] or ""), _plain(_cell(flat.get("epochs_run"))),
                *(_plain(_cell(flat.get(k))) for k in SUMMARY_METRICS),
            )
    _console().print(table)
    return 0


def _flat(metrics: dict[str, Any]) -> dict[str, Any]:
    from imagerec.store.catalog import flatten_metrics

    return flatten_metrics(metrics or {})


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def export_dataset_command(name: str, out: str, db: str | None = None) -> int:
    """`imagerec export-dataset NAME OUT [--db URL]`: write the images back to a folder."""
    with open_store(db) as store:
        n = export_dataset(store, name, out)
    _console().print(f"exported {n} images of '{name}' to {out}", highlight=False, markup=False)
    manifest = Path(out).expanduser() / "manifest.jsonl"
    if manifest.is_file():  # read as a folder, each image would silently keep its first label only
        _console().print(f"multi-label: every image's labels are in {manifest}; train on that file (the folder "
                         "alone gives each image its first label only)", highlight=False, markup=False)
    return 0
