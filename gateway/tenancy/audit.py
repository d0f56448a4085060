"""The audit log: one row per admin change, written in the same transaction as the change."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.tenancy.database import Database
from gateway.tenancy.errors import store_errors
from gateway.tenancy.records import AuditEntry
from gateway.tenancy.tables import audit_log


async def append_audit(
    conn: AsyncConnection,
    *,
    at: datetime,
    actor: str,
    action: str,
    target_type: str,
    target_id: str,
    tenant_id: str | None,
    details: dict[str, Any],
) -> None:
    await conn.execute(
        audit_log.insert().values(
            at=at,
            actor=actor,
            action=action,
            target_type=target_type,
            target_id=target_id,
            tenant_id=tenant_id,
            details=details,
        )
    )


class AuditLog:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def entries(self, *, tenant_id: str | None = None, limit: int = 100) -> list[AuditEntry]:
        query = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
        if tenant_id is not None:
            query = query.where(audit_log.c.tenant_id == tenant_id)
        with store_errors():
            async with self._db.engine.connect() as conn:
                rows = (await conn.execute(query)).all()
        return [_entry(row) for row in rows]


def _entry(row: Row[Any]) -> AuditEntry:
    return AuditEntry(
        id=row.id,
        at=row.at,
        actor=row.actor,
        action=row.action,
        target_type=row.target_type,
        target_id=row.target_id,
        tenant_id=row.tenant_id,
        details=dict(row.details),
    )
