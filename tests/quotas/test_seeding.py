"""Where budgets start (`quotas/seeding.py`): the ledger and the meter's unwritten records, each
record once, one query per tenant and period however many admissions ask at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.errors import StoreUnavailable
from gateway.metering import Meter
from gateway.tenancy.database import Database
from gateway.tenancy.ledger import Ledger, ModelUsage
from gateway.usage import UsageRecord
from quotas.checks import Check, Kind
from quotas.plan import plan_checks
from quotas.policy import Limits, QuotaPolicy
from quotas.seeding import BudgetSeeds, LedgerUsage
from quotas.store import StoreFailure

NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
NOVEMBER = (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))


def _record(request_id: str, at: datetime, tenant: str = "ten_a", cost: int = 10) -> UsageRecord:
    return UsageRecord(
        request_id=request_id,
        tenant_id=tenant,
        key_id="k",
        model="tiny-chat",
        endpoint="chat/completions",
        prompt_tokens=3,
        completion_tokens=5,
        status=200,
        outcome="ok",
        usage_exact=True,
        ttft_ms=None,
        duration_ms=1.0,
        created_at=at,
        cost_micro_eur=cost,
    )


async def test_the_meters_unwritten_records_count_once(tmp_path: Path) -> None:
    database = Database.from_url(f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    await database.migrate()
    ledger = Ledger(database)
    await ledger.write([_record("written", NOW)])
    written, release = asyncio.Event(), asyncio.Event()

    class Acknowledging:
        """A ledger whose acknowledgement is late: the batch is in it, and still held."""

        async def write(self, records: Sequence[UsageRecord]) -> None:
            await ledger.write(records)
            written.set()
            await release.wait()

    meter = Meter(Acknowledging(), spool=tmp_path / "spool.jsonl", linger_s=0.0)
    await meter.start()
    meter.record(_record("in-batch", NOW))
    await written.wait()
    meter.record(_record("held", NOW))
    meter.record(_record("last-month", NOW - timedelta(days=30)))
    meter.record(_record("another-tenant", NOW, tenant="ten_b"))
    assert len(meter.unwritten()) == 4

    used = await LedgerUsage(ledger, meter).used("ten_a", *NOVEMBER)
    assert used == [ModelUsage("tiny-chat", tokens=3 * 8, cost_micro_eur=3 * 10)]
    release.set()
    await meter.aclose(drain_s=5)
    assert await LedgerUsage(ledger, meter).used("ten_a", *NOVEMBER) == used
    await database.dispose()


class Source:
    def __init__(self) -> None:
        self.asked: list[tuple[str, datetime, datetime]] = []
        self.answer = asyncio.Event()
        self.failure: Exception | None = None

    async def used(self, tenant_id: str, start: datetime, end: datetime) -> list[ModelUsage]:
        self.asked.append((tenant_id, start, end))
        await self.answer.wait()
        if self.failure is not None:
            raise self.failure
        return [ModelUsage("tiny-chat", 100, 5_000), ModelUsage("tiny-embed", 10, 0)]


def _budgets() -> list[Check]:
    policy = QuotaPolicy(
        requests_per_minute=10,
        tokens_per_day=1_000,
        tokens_per_month=10_000,
        eur_per_month=1.0,
        models={"tiny-chat": Limits(tokens_per_day=500, eur_per_month=0.5)},
    )
    checks = plan_checks(policy, tenant_id="ten_a", model_id="tiny-chat", now=NOW, lease_s=900)
    return [check for check in checks if check.kind is Kind.BUDGET]


async def test_one_query_per_period_whoever_asks_and_whoever_gives_up() -> None:
    source = Source()
    seeds = BudgetSeeds()
    seeds.read_from(source)
    checks = _budgets()
    asking = [asyncio.create_task(seeds(checks)) for _ in range(10)]
    await asyncio.sleep(0.01)
    asking[0].cancel()  # a request cancelled while its budgets are seeded
    source.answer.set()
    results = await asyncio.gather(*asking[1:])
    day = datetime(2026, 11, 15, tzinfo=UTC)
    assert sorted(source.asked) == [("ten_a", *NOVEMBER), ("ten_a", day, day + timedelta(days=1))]
    # tenant: tokens today, this month, euros; tiny-chat: tokens today, euros.
    assert [c.limit_name for c in checks] == [
        "tokens_per_day",
        "tokens_per_month",
        "eur_per_month",
        "tokens_per_day",
        "eur_per_month",
    ]
    assert results == [[110, 110, 5_000, 100, 5_000]] * 9
    with contextlib.suppress(asyncio.CancelledError):
        await asking[0]
    await seeds(checks)
    assert len(source.asked) == 4  # the next seeding asks anew


async def test_a_ledger_that_cannot_answer_fails_the_seed() -> None:
    seeds = BudgetSeeds(timeout_s=0.05)
    with pytest.raises(StoreFailure, match="before start-up"):
        await seeds(_budgets())
    source = Source()
    seeds.read_from(source)
    with pytest.raises(StoreFailure, match="no usage within"):
        await seeds(_budgets())  # never answers
    source.failure = StoreUnavailable("The tenant store is unavailable; try again shortly.")
    source.answer.set()
    with pytest.raises(StoreFailure, match="tenant store is unavailable"):
        await seeds(_budgets())
