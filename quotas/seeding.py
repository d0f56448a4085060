"""Budgets seeded from the usage ledger, so that they survive restarts and the loss of Redis.

A store seeds a budget key when it finds it unseeded: the in-process store each budget at its
first admission after a start, Redis a key it lost (`quotas/redis.py`), both a new day's or
month's key. The seed is what the key's scope (the tenant, or one of its models) used in its
period (the UTC day or month, `quotas/plan.py`) by the ledger: prompt plus completion tokens
for token budgets, each record's `cost_micro_eur` (priced when metered) for money. The records
this gateway's meter still holds count too, each once (the ledger query leaves them out).

What a seed does not see: records other gateways' meters still hold (the last
`SLUIS_METER_LINGER_S`, longer while the ledger is down), records spooled and not replayed yet,
and requests still running when Redis lost their admission records (their settles find nothing
to settle, their records come after the seed). Where Redis lost a budget key but kept the
admission records, a request metered before the key is seeded again and settled after it (its
settle retried) counts twice: on the safe side. And the ledger dates a request when it is
metered, the budgets when it is admitted (review M8): a request that runs over midnight counts
in the old day's key, and in the new day's too if that key is seeded after the request ends.

Every seeding of one tenant and period at once in this process shares one ledger query.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from gateway.errors import ServiceUnavailable
from gateway.metering import Meter
from gateway.tenancy.ledger import Ledger, ModelUsage
from quotas.checks import Check
from quotas.plan import budget_period, tenant_of
from quotas.store import StoreFailure

SEED_TIMEOUT_S = 5.0  # a month of a large tenant's records is summed, once per period and loss

Period = tuple[str, datetime, datetime]  # tenant id, start, end


class UsageSource(Protocol):
    async def used(self, tenant_id: str, start: datetime, end: datetime) -> list[ModelUsage]: ...


class LedgerUsage:
    """What the ledger holds and what this gateway's meter has not written yet, each once."""

    def __init__(self, ledger: Ledger, meter: Meter) -> None:
        self._ledger = ledger
        self._meter = meter

    async def used(self, tenant_id: str, start: datetime, end: datetime) -> list[ModelUsage]:
        held = [
            record
            for record in self._meter.unwritten()
            if record.tenant_id == tenant_id and start <= record.created_at < end
        ]
        rows = await self._ledger.used(
            tenant_id, start, end, excluding=[record.request_id for record in held]
        )
        totals = {row.model: (row.tokens, row.cost_micro_eur) for row in rows}
        for record in held:
            tokens, cost = totals.get(record.model, (0, 0))
            tokens += record.prompt_tokens + record.completion_tokens
            totals[record.model] = (tokens, cost + record.cost_micro_eur)
        return [ModelUsage(model, tokens, cost) for model, (tokens, cost) in totals.items()]


class BudgetSeeds:
    """The stores' `SeedSource`. It reads nothing until start-up hands it the ledger
    (`read_from`), once the meter has replayed what a previous run spooled."""

    def __init__(self, *, timeout_s: float = SEED_TIMEOUT_S) -> None:
        self._source: UsageSource | None = None
        self._timeout_s = timeout_s
        self._queries: dict[Period, asyncio.Task[list[ModelUsage]]] = {}

    def read_from(self, source: UsageSource) -> None:
        self._source = source

    async def __call__(self, checks: Sequence[Check]) -> list[int]:
        periods = [(tenant_of(check.key), *budget_period(check)) for check in checks]
        distinct = list(dict.fromkeys(periods))
        found = await asyncio.gather(*(self._used(period) for period in distinct))
        usage = dict(zip(distinct, found, strict=True))
        return [_amount(check, usage[p]) for check, p in zip(checks, periods, strict=True)]

    async def _used(self, period: Period) -> list[ModelUsage]:
        query = self._queries.get(period)
        if query is None:
            query = self._queries[period] = asyncio.create_task(self._query(*period))
            query.add_done_callback(lambda done: self._finished(period, done))
        # Shielded: a caller that gives up (its request cancelled) ends no one else's wait.
        return await asyncio.shield(query)

    def _finished(self, period: Period, query: asyncio.Task[list[ModelUsage]]) -> None:
        if self._queries.get(period) is query:
            del self._queries[period]
        if not query.cancelled():
            query.exception()  # retrieved, should every caller have given up

    async def _query(self, tenant_id: str, start: datetime, end: datetime) -> list[ModelUsage]:
        if self._source is None:
            raise StoreFailure("budgets cannot be seeded before start-up has opened the ledger")
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self._source.used(tenant_id, start, end)
        except TimeoutError as exc:
            raise StoreFailure(f"ledger: no usage within {self._timeout_s} s to seed") from exc
        except ServiceUnavailable as exc:
            raise StoreFailure(f"ledger: {exc.message}") from exc


def _amount(check: Check, usage: Sequence[ModelUsage]) -> int:
    rows = [row for row in usage if check.model is None or row.model == check.model]
    if check.code == "budget_money":
        return sum(row.cost_micro_eur for row in rows)
    return sum(row.tokens for row in rows)
