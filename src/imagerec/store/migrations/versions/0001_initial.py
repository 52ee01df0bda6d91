"""Initial schema: datasets, blobs, images, runs, predictions.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen copies of the column types: a revision never imports the live schema module.
JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
UTCDateTime = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("class_names", JSONType, nullable=False),
        sa.Column("multi_label", sa.Boolean, nullable=False),
        sa.UniqueConstraint("name", name="uq_datasets_name"),
    )
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "images",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("dataset_id", sa.Integer, sa.ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False),
        sa.Column("sha256", sa.String(64), sa.ForeignKey("blobs.sha256"), nullable=False),
        sa.Column("original_path", sa.Text, nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("labels", JSONType, nullable=False),
        sa.Column("split", sa.String(16), nullable=False),
        sa.UniqueConstraint("dataset_id", "sha256", name="uq_images_dataset_sha256"),
    )
    op.create_index("ix_images_sha256", "images", ["sha256"])
    op.create_table(
        "runs",
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
    op.create_table(
        "predictions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="SET NULL"), nullable=True),
        sa.Column("model_id", sa.Text, nullable=False),
        sa.Column("topk", JSONType, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_predictions_image_sha256", "predictions", ["image_sha256"])


def downgrade() -> None:
    op.drop_table("predictions")
    op.drop_table("runs")
    op.drop_table("images")
    op.drop_table("blobs")
    op.drop_table("datasets")
