"""Predictions say which served version made them and for which HTTP request.

`served_as` is "name@version" as `imagerec serve` answered it (X-Model-Version); `request_id` is
the request_id of its answer, indexed so a request can be looked up. Both are nullable: rows
recorded before this revision, or through the Python API without them, have neither.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable columns without a default: PostgreSQL and SQLite add them without rewriting the table.
    op.add_column("predictions", sa.Column("served_as", sa.Text, nullable=True))
    op.add_column("predictions", sa.Column("request_id", sa.String(32), nullable=True))
    op.create_index("ix_predictions_request_id", "predictions", ["request_id"])


def downgrade() -> None:
    op.drop_index("ix_predictions_request_id", table_name="predictions")
    with op.batch_alter_table("predictions") as batch:  # SQLite before 3.35 has no DROP COLUMN
        batch.drop_column("request_id")
        batch.drop_column("served_as")
