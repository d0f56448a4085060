"""Which gateway metered each usage record, so each can seed its Prometheus counters.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage_records") as batch:
        batch.add_column(sa.Column("gateway_id", sa.String(128), nullable=False, server_default=""))
    op.create_index("ix_usage_gateway", "usage_records", ["gateway_id"])


def downgrade() -> None:
    op.drop_index("ix_usage_gateway", "usage_records")
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_column("gateway_id")
