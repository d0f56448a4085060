"""Alembic environment: Sluis runs migrations itself, on a connection it hands over."""

from __future__ import annotations

from alembic import context

from gateway.tenancy.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `sluis db upgrade` (it provides the connection)")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
