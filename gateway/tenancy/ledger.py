"""The usage ledger: records written idempotently by request id, and summed for reports."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Table, func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from gateway.tenancy.database import Database
from gateway.tenancy.errors import store_errors
from gateway.tenancy.tables import tenants, usage_records
from gateway.usage import UsageRecord

_INSERTS: dict[str, Callable[[Table], Any]] = {
    "postgresql": postgresql_insert,
    "sqlite": sqlite_insert,
}


@dataclass(frozen=True, slots=True)
class UsageFilter:
    tenant_id: str | None = None
    model: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class UsageTotal:
    tenant_id: str
    tenant: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "tenant": self.tenant,
            "model": self.model,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class Ledger:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._insert = _INSERTS[db.dialect]

    async def write(self, records: Sequence[UsageRecord]) -> None:
        """Insert records; one already present (same request id) is left as it is."""
        if not records:
            return
        statement = self._insert(usage_records).on_conflict_do_nothing(
            index_elements=["request_id"]
        )
        with store_errors():
            async with self._db.engine.begin() as conn:
                await conn.execute(statement, [record.to_row() for record in records])

    async def totals(self, where: UsageFilter) -> list[UsageTotal]:
        u = usage_records
        query = (
            select(
                u.c.tenant_id,
                tenants.c.name,
                u.c.model,
                func.count().label("requests"),
                func.coalesce(func.sum(u.c.prompt_tokens), 0).label("prompt_tokens"),
                func.coalesce(func.sum(u.c.completion_tokens), 0).label("completion_tokens"),
            )
            .join(tenants, tenants.c.id == u.c.tenant_id)
            .group_by(u.c.tenant_id, tenants.c.name, u.c.model)
            .order_by(tenants.c.name, u.c.model)
        )
        for condition in _conditions(where):
            query = query.where(condition)
        with store_errors():
            async with self._db.engine.connect() as conn:
                rows = (await conn.execute(query)).all()
        return [
            UsageTotal(
                tenant_id=row[0],
                tenant=row[1],
                model=row[2],
                requests=int(row[3]),
                prompt_tokens=int(row[4]),
                completion_tokens=int(row[5]),
            )
            for row in rows
        ]

    async def records(self, where: UsageFilter, *, limit: int = 100) -> list[UsageRecord]:
        query = select(usage_records).order_by(usage_records.c.created_at.desc()).limit(limit)
        for condition in _conditions(where):
            query = query.where(condition)
        with store_errors():
            async with self._db.engine.connect() as conn:
                rows = (await conn.execute(query)).all()
        return [UsageRecord(**row._asdict()) for row in rows]


def _conditions(where: UsageFilter) -> list[Any]:
    u = usage_records
    conditions: list[Any] = []
    if where.tenant_id is not None:
        conditions.append(u.c.tenant_id == where.tenant_id)
    if where.model is not None:
        conditions.append(u.c.model == where.model)
    if where.start is not None:
        conditions.append(u.c.created_at >= where.start)
    if where.end is not None:
        conditions.append(u.c.created_at < where.end)
    if where.request_id is not None:
        conditions.append(u.c.request_id == where.request_id)
    return conditions
