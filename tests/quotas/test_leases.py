"""Leases never lapse under a live request: the gateway renews the reservations and slots of the
requests it is running, and they lapse only once it is gone. Over both stores, with time moved
by hand (renewal rounds are called, never slept for)."""

from __future__ import annotations

import asyncio
import gc
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from billing.prices import PriceBook
from gateway.admission import AdmissionRequest, Admitted
from gateway.auth import Principal
from gateway.catalog import Model
from gateway.clock import ManualClock
from gateway.errors import RateLimited
from gateway.generation import Generation
from gateway.metrics import Metrics
from gateway.tenancy.records import Tenant
from gateway.upstreams.base import Endpoint
from quotas.admission import QuotaAdmission
from quotas.checks import Check
from quotas.memory import MemoryStore
from quotas.policy import QuotaPolicy
from quotas.store import QuotaStore, StoreFailure
from tests.quotas.test_store_contract import T0, budget, concurrency, window

LEASE_S = 120.0
START = datetime.fromtimestamp(T0, UTC)  # ahead of Redis's clock: budget keys' TTLs hold
MODEL = Model(id="chat", task="generate", upstream_model="chat", tokenizer="whitespace")


# The store contract for renewals and splits.


async def test_renewed_leases_outlive_their_first_expiry(store: QuotaStore, tenant: str) -> None:
    checks = [budget(tenant, 800, cost=400, lease=100), concurrency(tenant, 2, lease=100)]
    for request in ("running", "done"):
        assert (await store.admit(checks, request, T0)).allowed
    await store.settle(checks, "done", [50, 1], admitted_at=T0, now=T0 + 10)
    for t in (90, 180):
        await store.renew(checks, ["running", "done", "never-admitted"], T0 + t)
    spent, slots = await store.state(checks, T0 + 250)
    # The running request holds its reservation and slot; the settled one stays settled.
    assert (spent.used, spent.reserved, slots.used) == (50, 400, 1)
    assert not (await store.admit(checks, "too-much", T0 + 250)).allowed  # 50 + 400 + 400
    spent, slots = await store.state(checks, T0 + 281)  # no renewal since T0 + 180
    assert (spent.used, spent.reserved, slots.used) == (50, 0, 0)


async def test_a_lapsed_lease_is_not_renewed(store: QuotaStore, tenant: str) -> None:
    checks = [budget(tenant, 1000, cost=400, lease=100), concurrency(tenant, 1, lease=100)]
    assert (await store.admit(checks, "late", T0)).allowed
    await store.renew(checks, ["late"], T0 + 101)
    spent, slots = await store.state(checks, T0 + 102)
    assert (spent.reserved, slots.used) == (0, 0)
    # Its usage still counts when it settles at last.
    await store.settle(checks, "late", [30, 1], admitted_at=T0, now=T0 + 150)
    spent, slots = await store.state(checks, T0 + 150)
    assert (spent.used, spent.reserved, slots.used) == (30, 0, 0)


async def test_a_long_request_renewed_is_still_settled(store: QuotaStore, tenant: str) -> None:
    # Concurrency alone: the admission's record lives a lease, and is renewed with the slot.
    checks = [concurrency(tenant, 1, lease=100)]
    assert (await store.admit(checks, "long", T0)).allowed
    for t in (60, 120, 180, 240):
        await store.renew(checks, ["long"], T0 + t)
    await store.settle(checks, "long", [1], admitted_at=T0, now=T0 + 250)
    [slots] = await store.state(checks, T0 + 250)
    assert slots.used == 0
    assert (await store.admit(checks, "next", T0 + 250)).allowed


async def test_a_split_settles_the_finished_part_and_keeps_the_rest(
    store: QuotaStore, tenant: str
) -> None:
    tpm = window(tenant, 10_000, cost=500, name="tpm")
    tpd = budget(tenant, 10_000, cost=1000, lease=100)
    slots = concurrency(tenant, 10, lease=100)
    grant = [tpm, tpd, replace(slots, cost=5)]
    assert (await store.admit(grant, "a", T0)).allowed
    # Finished so far: 300 tokens; two requests still run, holding 100 of the window (counted
    # in the grant's bucket), 200 of the budget and two slots.
    await store.split(grant, "a", [300, 300, 0], "a2", [100, 200, 2], T0 + 20)
    assert await states(store, grant, T0 + 20) == [(400, 0), (300, 200), (2, 0)]
    await store.split(grant, "a", [300, 300, 0], "a2", [100, 200, 2], T0 + 21)  # a repeat
    assert await states(store, grant, T0 + 21) == [(400, 0), (300, 200), (2, 0)]
    rest = [replace(tpm, cost=100), replace(tpd, cost=200), replace(slots, cost=2)]
    await store.settle(rest, "a2", [80, 150, 2], admitted_at=T0, now=T0 + 30)
    assert await states(store, grant, T0 + 30) == [(380, 0), (450, 0), (0, 0)]


async def test_the_rest_of_a_split_is_a_lease_of_its_own(store: QuotaStore, tenant: str) -> None:
    tpd = budget(tenant, 10_000, cost=1000, lease=100)
    slots = concurrency(tenant, 10, lease=100)
    grant = [tpd, replace(slots, cost=5)]
    assert (await store.admit(grant, "a", T0)).allowed
    await store.split(grant, "a", [300, 0], "a2", [200, 2], T0 + 50)  # its lease: to T0 + 150
    rest = [replace(tpd, cost=200), replace(slots, cost=2)]
    await store.renew(rest, ["a2"], T0 + 140)
    assert await states(store, grant, T0 + 200) == [(300, 200), (2, 0)]
    assert await states(store, grant, T0 + 241) == [(300, 0), (0, 0)]


async def test_a_split_of_what_was_settled_changes_nothing(store: QuotaStore, tenant: str) -> None:
    checks = [budget(tenant, 10_000, cost=1000, lease=100), concurrency(tenant, 10, lease=100)]
    assert (await store.admit(checks, "a", T0)).allowed
    await store.settle(checks, "a", [700, 1], admitted_at=T0, now=T0 + 1)
    await store.split(checks, "a", [300, 0], "a2", [200, 1], T0 + 2)
    await store.split(checks, "never", [300, 0], "n2", [200, 1], T0 + 2)
    assert await states(store, checks, T0 + 2) == [(700, 0), (0, 0)]


async def states(store: QuotaStore, checks: list[Check], now: float) -> list[tuple[int, int]]:
    return [(s.used, s.reserved) for s in await store.state(checks, now)]


# The gateway's side: the live reservations, renewed by a heartbeat.


def admission(
    store: QuotaStore,
    clock: ManualClock,
    metrics: Metrics | None = None,
    renew_every_s: float | None = None,
) -> QuotaAdmission:
    return QuotaAdmission(
        store,
        defaults=QuotaPolicy(),
        prices=PriceBook({}),
        clock=clock,
        metrics=metrics or Metrics(),
        fail_mode="closed",
        timeout_s=2.0,
        lease_s=LEASE_S,
        renew_every_s=renew_every_s,
    )


def tenant_with(tenant_id: str, quotas: dict[str, Any], clock: ManualClock) -> Tenant:
    now = clock.now()
    return Tenant(tenant_id, "acme", "active", ("*",), {}, now, now, quotas)


def ask(tenant: Tenant, request_id: str, max_tokens: int = 100) -> AdmissionRequest:
    return AdmissionRequest(
        principal=Principal(tenant, "key_1"),
        model=MODEL,
        request_id=request_id,
        endpoint=Endpoint.CHAT,
        generation=Generation(
            prompt_tokens=10, max_tokens=max_tokens, sequences=1, defaulted=False
        ),
    )


async def test_running_streams_keep_their_slots_past_the_lease(
    store: QuotaStore, tenant: str
) -> None:
    # The review's H2: max_concurrent=4, four long streams; before, their slots lapsed after
    # the lease while they ran, and four more were admitted every lease period.
    clock = ManualClock(START)
    quotas = admission(store, clock)
    acme = tenant_with(tenant, {"max_concurrent": 4}, clock)
    running = [await quotas.admit(ask(acme, f"s{i}")) for i in range(4)]
    for _ in range(7):  # seven renewal rounds: well past twice the lease
        clock.advance(LEASE_S / 3)
        await quotas.renew()
    with pytest.raises(RateLimited) as refused:
        await quotas.admit(ask(acme, "s5"))
    assert refused.value.code == "concurrency"
    # The gateway is gone: nothing renews its streams any more, and after the lease their
    # slots are free for another gateway.
    clock.advance(LEASE_S + 1)
    other = admission(store, clock)
    for i in range(4):
        await other.admit(ask(acme, f"t{i}"))  # a refusal would raise
    assert len(running) == 4  # held to here: these requests were alive all along
    await quotas.aclose(drain_s=1.0)
    await other.aclose(drain_s=1.0)


async def test_a_running_requests_budget_reservation_survives_the_lease(
    store: QuotaStore, tenant: str
) -> None:
    clock = ManualClock(START)
    quotas = admission(store, clock)
    acme = tenant_with(tenant, {"tokens_per_day": 1000}, clock)
    first = await quotas.admit(ask(acme, "long", max_tokens=590))  # reserves 600
    for _ in range(6):
        clock.advance(LEASE_S / 3)
        await quotas.renew()
    with pytest.raises(RateLimited) as refused:  # 600 + 600 > 1000: the reservation holds
        await quotas.admit(ask(acme, "second", max_tokens=590))
    assert refused.value.code == "budget_tokens"
    await quotas.settle(first, prompt_tokens=10, completion_tokens=200)
    await quotas.drain()
    assert await quotas.admit(ask(acme, "second", max_tokens=590))
    [row] = [r for r in await quotas.report(tenant, quotas.policy_for(acme)) if r["scope"] == "all"]
    assert (row["used"], row["reserved"]) == (210, 600)
    await quotas.aclose(drain_s=1.0)


async def test_a_request_dropped_without_a_settle_is_not_renewed(
    store: QuotaStore, tenant: str
) -> None:
    # A request that ended on a path that never settled (a bug) must not hold its slot for ever.
    clock = ManualClock(START)
    quotas = admission(store, clock)
    acme = tenant_with(tenant, {"max_concurrent": 1}, clock)
    admitted: Admitted | None = await quotas.admit(ask(acme, "lost"))
    assert admitted is not None
    del admitted
    gc.collect()
    for _ in range(4):
        clock.advance(LEASE_S / 3)
        await quotas.renew()
    assert await quotas.admit(ask(acme, "next"))
    await quotas.aclose(drain_s=1.0)


class FlakyRenewals(MemoryStore):
    """The in-process store, whose first renewals fail (the store, then a bug)."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: list[BaseException] = [StoreFailure("down"), RuntimeError("a bug")]
        self.renewed = 0
        self.renewed_twice = asyncio.Event()

    async def renew(self, *args: Any, **kwargs: Any) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.renewed += 1
        if self.renewed == 2:
            self.renewed_twice.set()
        await super().renew(*args, **kwargs)


async def test_the_heartbeat_survives_failures_and_stops_at_close(tenant: str) -> None:
    store = FlakyRenewals()
    metrics = Metrics()
    clock = ManualClock(START)
    quotas = admission(store, clock, metrics, renew_every_s=0.01)
    acme = tenant_with(tenant, {"max_concurrent": 2}, clock)
    running = await quotas.admit(ask(acme, "r1"))
    async with asyncio.timeout(5):
        await store.renewed_twice.wait()
    failures = metrics.registry.get_sample_value(
        "sluis_quota_store_failures_total", {"mode": "retry", "operation": "renew"}
    )
    assert failures == 2
    await quotas.aclose(drain_s=1.0)
    renewed = store.renewed
    await asyncio.sleep(0.05)  # five beats' time: none comes after the close
    assert store.renewed == renewed
    assert running.reservation is not None
