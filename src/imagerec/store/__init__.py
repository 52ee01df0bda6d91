"""The image store: datasets, image bytes, training runs and predictions in one database.

SQLite file by default (`$IMAGEREC_DB`, else `$IMAGEREC_HOME/store.db`, else
`~/.local/share/imagerec/store.db`), PostgreSQL by URL. The schema is managed by Alembic
(revisions ship in `store/migrations/`) and upgraded to head whenever a store is opened.

Where the image bytes live — in the database. A `blobs` table (BLOB on SQLite, bytea on
PostgreSQL) keyed by the sha256 of the bytes holds each distinct file once, shared by every
dataset that contains it; `images` rows reference it by a foreign key. The other option, a
content-addressed folder of files next to a SQLite database, was rejected:

- crash safety for free: the blobs and the image rows of a batch commit in one transaction,
  so `kill -9` at any instant leaves no orphan blob and no image without its bytes; a blob
  folder needs write-then-rename, fsync ordering and a garbage collector for the files of
  rolled-back batches;
- one behaviour on both backends: a PostgreSQL store needs no shared filesystem, and backup is
  one database dump (or one SQLite file);
- speed is not the bottleneck: ingest spends its time reading, hashing and checking images.
  Images of several MB each work too (batches are cut at 256 MB), though multi-GB datasets of
  large photos are better kept in PostgreSQL than in one SQLite file.

Measured on 2 shared CPU cores with mnist-mini (7000 IDX images stored as PNG, ~270 bytes each):
reading + PNG-encoding + hashing + checking runs at ~4000-5000 images/s; the batch writes alone
run at ~13000-18000 images/s into SQLite with DB blobs, ~2300-3400 images/s into a local
PostgreSQL 15, and ~800 images/s into SQLite with a blob folder instead (190 images/s when each
file is fsynced, which a folder needs to be as crash-safe as a commit). End to end: ~5000-6000
images/s into SQLite, ~2500 images/s into PostgreSQL.

Example:
    >>> from imagerec.store import open_store, ingest, list_datasets
    >>> with open_store() as store:
    ...     ingest(store, "mnist-mini", "mnist-mini").added
    7000
"""

from __future__ import annotations

from imagerec.store.blobref import StoreBlob, read_blob
from imagerec.store.catalog import (
    compare_runs,
    list_datasets,
    list_predictions,
    list_runs,
    record_predictions,
    record_run,
    record_run_dir,
)
from imagerec.store.commands import datasets_command, export_dataset_command, ingest_command, runs_command
from imagerec.store.db import Store, migrate, open_store
from imagerec.store.export import export_dataset
from imagerec.store.ingest import IngestReport, LabelConflict, ingest
from imagerec.store.reader import read_store

__all__ = [
    "IngestReport",
    "LabelConflict",
    "Store",
    "StoreBlob",
    "compare_runs",
    "datasets_command",
    "export_dataset",
    "export_dataset_command",
    "ingest",
    "ingest_command",
    "list_datasets",
    "list_predictions",
    "list_runs",
    "migrate",
    "open_store",
    "read_blob",
    "read_store",
    "record_predictions",
    "record_run",
    "record_run_dir",
    "runs_command",
]
