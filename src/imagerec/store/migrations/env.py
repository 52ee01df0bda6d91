"""Alembic environment: always driven programmatically by `imagerec.store.db.migrate`.

The caller passes an open connection, already inside the transaction that holds the migration
lock, in `config.attributes["connection"]`; every revision runs in that one transaction.
"""

from __future__ import annotations

from alembic import context

from imagerec.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("imagerec store migrations run through imagerec.store.open_store(), not the alembic CLI")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite has no ALTER COLUMN
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
