"""The store's tables as SQLAlchemy Core metadata (the Alembic revisions create them; this mirrors head).

JSON columns are JSONB on PostgreSQL so they can be grouped and compared; TEXT JSON on SQLite.
Times are UTC.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
UTCDateTime = sa.DateTime(timezone=True)

metadata = sa.MetaData()

datasets = sa.Table(
    "datasets",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("class_names", JSONType, nullable=False),
    sa.Column("multi_label", sa.Boolean, nullable=False),
    sa.UniqueConstraint("name", name="uq_datasets_name"),
)

# Content-addressed image bytes, shared by every dataset that holds the same file.
blobs = sa.Table(
    "blobs",
    metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

images = sa.Table(
    "images",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("dataset_id", sa.Integer, sa.ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False),
    sa.Column("sha256", sa.String(64), sa.ForeignKey("blobs.sha256"), nullable=False, index=True),
    sa.Column("original_path", sa.Text, nullable=False),
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
    sa.Column("mode", sa.String(16), nullable=False),
    sa.Column("format", sa.String(16), nullable=False),
    sa.Column("labels", JSONType, nullable=False),
    sa.Column("split", sa.String(16), nullable=False),
    sa.UniqueConstraint("dataset_id", "sha256", name="uq_images_dataset_sha256"),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("run_dir", sa.Text, nullable=False),
    sa.Column("config", JSONType, nullable=False),
    sa.Column("metrics", JSONType, nullable=False),
    sa.Column("versions", JSONType, nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    sa.Column("data_origin", sa.Text, nullable=True),
    sa.Column("data_fingerprint", sa.String(64), nullable=True),
    sa.UniqueConstraint("run_dir", name="uq_runs_run_dir"),
)

predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    # no foreign key: predictions may be made on images that were never ingested
    sa.Column("image_sha256", sa.String(64), nullable=False, index=True),
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="SET NULL"), nullable=True),
    sa.Column("model_id", sa.Text, nullable=False),
    sa.Column("topk", JSONType, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # revision 0002: what `imagerec serve --db` answered with ("name@version", and the answer's
    # request_id); NULL in rows recorded before it or without them
    sa.Column("served_as", sa.Text, nullable=True),
    sa.Column("request_id", sa.String(32), nullable=True, index=True),
)
