"""The usage ledger: records written idempotently by request id, and summed for reports."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Executable, func, select

from billing.periods import month_start, period_of, previous_month_start
from gateway.tenancy.database import Database
from gateway.tenancy.errors import store_errors
from gateway.tenancy.tables import tenants, usage_records
from gateway.usage import UsageRecord

_COLUMNS = tuple(column.name for column in usage_records.columns)
_CREATED_AT = _COLUMNS.index("created_at")
# Written with the driver's own executemany: SQLAlchemy's per-row parameter processing costs
# more CPU than the database does, and it runs on the event loop.
_INSERT_SQL = {
    "sqlite": f"INSERT OR IGNORE INTO usage_records ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _COLUMNS)})",
    "postgresql": f"INSERT INTO usage_records ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(_COLUMNS) + 1))}) "
    "ON CONFLICT (request_id) DO NOTHING",
}


@dataclass(frozen=True, slots=True)
class UsageFilter:
    tenant_id: str | None = None
    model: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class CounterSeed:
    tenant: str
    model: str
    status: int
    period: str  # YYYY-MM
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_micro_eur: int


@dataclass(frozen=True, slots=True)
class ModelUsage:
    """What a tenant used of one model in a period: where its quota budgets start."""

    model: str
    tokens: int
    cost_micro_eur: int


@dataclass(frozen=True, slots=True)
class UsageTotal:
    tenant_id: str
    tenant: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_micro_eur: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "tenant": self.tenant,
            "model": self.model,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "cost_eur": self.cost_micro_eur / 1_000_000,
        }


class Ledger:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._insert_sql = _INSERT_SQL[db.dialect]
        self._naive_times = db.dialect == "sqlite"

    async def write(self, records: Sequence[UsageRecord]) -> None:
        """Insert records; one already present (same request id) is left as it is."""
        if not records:
            return
        rows = [self._row(record) for record in records]
        with store_errors():
            async with self._db.engine.begin() as conn:
                await conn.exec_driver_sql(self._insert_sql, rows)

    async def _rows(self, query: Executable) -> list[Any]:
        with store_errors():
            async with self._db.engine.connect() as conn:
                return list((await conn.execute(query)).all())

    def _row(self, record: UsageRecord) -> tuple[Any, ...]:
        row = record.to_row()
        values = [row[name] for name in _COLUMNS]
        created_at = values[_CREATED_AT].astimezone(UTC)
        # SQLite keeps naive UTC text in SQLAlchemy's format, so that range queries compare.
        values[_CREATED_AT] = (
            created_at.strftime("%Y-%m-%d %H:%M:%S.%f") if self._naive_times else created_at
        )
        return tuple(values)

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
                func.coalesce(func.sum(u.c.cost_micro_eur), 0).label("cost_micro_eur"),
            )
            .join(tenants, tenants.c.id == u.c.tenant_id)
            .group_by(u.c.tenant_id, tenants.c.name, u.c.model)
            .order_by(tenants.c.name, u.c.model)
        )
        for condition in _conditions(where):
            query = query.where(condition)
        rows = await self._rows(query)
        return [
            UsageTotal(
                tenant_id=row[0],
                tenant=row[1],
                model=row[2],
                requests=int(row[3]),
                prompt_tokens=int(row[4]),
                completion_tokens=int(row[5]),
                cost_micro_eur=int(row[6]),
            )
            for row in rows
        ]

    async def counter_seed(self, gateway_id: str, *, now: datetime) -> list[CounterSeed]:
        """What one gateway metered in the current and the previous billing period, per tenant,
        model and status: where its counters start (older periods are no longer exported)."""
        u = usage_records
        current, previous = month_start(now), previous_month_start(now)
        seeds = []
        for start, end in ((previous, current), (current, None)):
            query = (
                select(
                    tenants.c.name,
                    u.c.model,
                    u.c.status,
                    func.count(),
                    func.coalesce(func.sum(u.c.prompt_tokens), 0),
                    func.coalesce(func.sum(u.c.completion_tokens), 0),
                    func.coalesce(func.sum(u.c.cost_micro_eur), 0),
                )
                .join(tenants, tenants.c.id == u.c.tenant_id)
                .where(u.c.gateway_id == gateway_id, u.c.created_at >= start)
                .group_by(tenants.c.name, u.c.model, u.c.status)
            )
            if end is not None:
                query = query.where(u.c.created_at < end)
            rows = await self._rows(query)
            period = period_of(start)
            seeds += [
                CounterSeed(r[0], r[1], int(r[2]), period, *(int(v) for v in r[3:7])) for r in rows
            ]
        return seeds

    async def used(
        self, tenant_id: str, start: datetime, end: datetime, *, excluding: Collection[str] = ()
    ) -> list[ModelUsage]:
        """Per model, the tokens (prompt and completion) and micro-euros a tenant used in
        [start, end), but for the records `excluding` names (the caller counts those itself)."""
        u = usage_records
        query = (
            select(
                u.c.model,
                func.coalesce(func.sum(u.c.prompt_tokens + u.c.completion_tokens), 0),
                func.coalesce(func.sum(u.c.cost_micro_eur), 0),
            )
            .where(u.c.tenant_id == tenant_id, u.c.created_at >= start, u.c.created_at < end)
            .group_by(u.c.model)
        )
        if excluding:
            query = query.where(u.c.request_id.not_in(list(excluding)))
        return [ModelUsage(row[0], int(row[1]), int(row[2])) for row in await self._rows(query)]

    async def records(self, where: UsageFilter, *, limit: int = 100) -> list[UsageRecord]:
        query = select(usage_records).order_by(usage_records.c.created_at.desc()).limit(limit)
        for condition in _conditions(where):
            query = query.where(condition)
        rows = await self._rows(query)
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
