"""One contract for every quota store, with time handed in (no sleeping)."""

from __future__ import annotations

import pytest

from quotas.checks import Check, Kind
from quotas.store import QuotaStore

T0 = 1_800_000_000.0  # a fixed instant; every test moves time by hand


def window(tenant: str, limit: int, cost: int = 1, name: str = "rpm") -> Check:
    code = "rate_limit_requests" if name == "rpm" else "rate_limit_tokens"
    return Check(f"sluis:q:{{{tenant}}}:all:{name}", Kind.WINDOW, code, limit, cost, 60.0)


def budget(tenant: str, limit: int, cost: int, lease: float = 900.0) -> Check:
    return Check(
        f"sluis:q:{{{tenant}}}:all:tpd",
        Kind.BUDGET,
        "budget_tokens",
        limit,
        cost,
        lease,
        period_end=T0 + 3600,
    )


def concurrency(tenant: str, limit: int, lease: float = 900.0) -> Check:
    return Check(f"sluis:q:{{{tenant}}}:all:conc", Kind.CONCURRENCY, "concurrency", limit, 1, lease)


async def test_window_admits_the_limit_then_refuses(store: QuotaStore, tenant: str) -> None:
    check = window(tenant, 3)
    for i in range(3):
        decision = await store.admit([check], f"r{i}", T0 + i)
        assert decision.allowed
        assert decision.states[0].remaining == 2 - i
    refused = await store.admit([check], "r3", T0 + 3)
    assert not refused.allowed and refused.failed == 0 and not refused.never
    # The first admission (bucket T0) leaves the window 61 buckets after it began.
    assert refused.retry_after_s == pytest.approx(58, abs=0.01)


async def test_window_has_no_boundary_doubling(store: QuotaStore, tenant: str) -> None:
    check = window(tenant, 5)
    for i in range(5):
        assert (await store.admit([check], f"a{i}", T0 + 59.5)).allowed
    # A fixed-window limiter would start afresh at T0 + 60; a sliding window must not.
    assert not (await store.admit([check], "b", T0 + 60.5)).allowed
    assert not (await store.admit([check], "c", T0 + 119.0)).allowed
    assert (await store.admit([check], "d", T0 + 121.0)).allowed


async def test_window_settles_tokens_to_the_actual_cost(store: QuotaStore, tenant: str) -> None:
    reserve = window(tenant, 1000, cost=600, name="tpm")
    assert (await store.admit([reserve], "r1", T0)).allowed
    assert not (await store.admit([reserve], "r2", T0 + 1)).allowed
    await store.settle([reserve], "r1", [100], admitted_at=T0, now=T0 + 2)
    [state] = await store.state([reserve], T0 + 2)
    assert state.used == 100
    assert (await store.admit([reserve], "r2", T0 + 2)).allowed


async def test_budget_reserves_then_reconciles(store: QuotaStore, tenant: str) -> None:
    check = budget(tenant, 100, cost=60)
    admitted = await store.admit([check], "r1", T0)
    assert admitted.allowed
    assert (admitted.states[0].used, admitted.states[0].reserved) == (0, 60)
    assert not (await store.admit([check], "r2", T0)).allowed  # 60 reserved + 60 > 100
    await store.settle([check], "r1", [25], admitted_at=T0, now=T0 + 1)
    [state] = await store.state([check], T0 + 1)
    assert (state.used, state.reserved, state.remaining) == (25, 0, 75)
    assert (await store.admit([check], "r2", T0 + 1)).allowed
    refused = await store.admit([check], "r3", T0 + 1)
    assert refused.retry_after_s == pytest.approx(3599)


async def test_budget_refuses_what_can_never_fit(store: QuotaStore, tenant: str) -> None:
    refused = await store.admit([budget(tenant, 100, cost=101)], "r1", T0)
    assert not refused.allowed and refused.never
    assert not (await store.admit([budget(tenant, 0, cost=1)], "r2", T0)).allowed


async def test_budget_reservation_expires_after_its_lease(store: QuotaStore, tenant: str) -> None:
    check = budget(tenant, 100, cost=80, lease=30)
    assert (await store.admit([check], "lost", T0)).allowed
    assert not (await store.admit([check], "r2", T0 + 29)).allowed
    assert (await store.admit([check], "r2", T0 + 31)).allowed  # the lost one expired
    # A late settle of the expired reservation adds its usage but frees nothing twice.
    await store.settle([check], "lost", [10], admitted_at=T0, now=T0 + 32)
    [state] = await store.state([check], T0 + 32)
    assert (state.used, state.reserved) == (10, 80)


async def test_concurrency_leases(store: QuotaStore, tenant: str) -> None:
    check = concurrency(tenant, 2, lease=100)
    assert (await store.admit([check], "r1", T0)).allowed
    assert (await store.admit([check], "r2", T0)).allowed
    assert not (await store.admit([check], "r3", T0)).allowed
    await store.settle([check], "r1", [1], admitted_at=T0, now=T0 + 1)
    assert (await store.admit([check], "r3", T0 + 1)).allowed
    assert (await store.admit([check], "r4", T0 + 101)).allowed  # r2 and r3 leases ran out


async def test_all_or_nothing(store: QuotaStore, tenant: str) -> None:
    rpm = window(tenant, 10)
    tight = budget(tenant, 50, cost=60)
    refused = await store.admit([rpm, tight], "r1", T0)
    assert not refused.allowed and refused.failed == 1
    [rpm_state, budget_state] = await store.state([rpm, tight], T0)
    assert (rpm_state.used, budget_state.reserved) == (0, 0)


async def test_tenants_do_not_share_limits(store: QuotaStore, tenant: str) -> None:
    assert (await store.admit([window(tenant, 1)], "r1", T0)).allowed
    assert not (await store.admit([window(tenant, 1)], "r2", T0)).allowed
    assert (await store.admit([window(tenant + "x", 1)], "r3", T0)).allowed


async def test_one_admission_may_hold_several_slots(store: QuotaStore, tenant: str) -> None:
    # An allowance (quotas/allowances.py) takes several concurrency slots under one id.
    three = Check(f"sluis:q:{{{tenant}}}:all:conc", Kind.CONCURRENCY, "concurrency", 4, 3, 100.0)
    assert (await store.admit([three], "a1", T0)).allowed
    assert (await store.admit([concurrency(tenant, 4)], "r1", T0)).allowed
    assert not (await store.admit([concurrency(tenant, 4)], "r2", T0)).allowed
    await store.settle([three], "a1", [0], admitted_at=T0, now=T0 + 1)
    [state] = await store.state([concurrency(tenant, 4)], T0 + 1)
    assert state.used == 1


async def test_large_and_zero_amounts_settle_exactly(store: QuotaStore, tenant: str) -> None:
    # Lua hands Redis its numbers as text: a settled 0 must not become "-0", nor 10^14 "1e+14".
    free = budget(tenant, 10, cost=0)
    assert (await store.admit([free], "r0", T0)).allowed
    await store.settle([free], "r0", [0], admitted_at=T0, now=T0 + 1)
    big = budget(tenant, 10**15, cost=125_000_000_000_001)
    assert (await store.admit([big], "r1", T0)).allowed
    await store.settle([big], "r1", [123_456_789_012_345], admitted_at=T0, now=T0 + 1)
    [state] = await store.state([big], T0 + 1)
    assert (state.used, state.reserved) == (123_456_789_012_345, 0)


async def test_a_repeated_settle_counts_once(store: QuotaStore, tenant: str) -> None:
    # A settle retried after its answer was lost, or repeated at shutdown, must change nothing:
    # not the budget's use, not the window (where it would erase other requests' tokens).
    tokens = window(tenant, 10_000, cost=600, name="tpm")
    checks = [tokens, budget(tenant, 10_000, cost=600), concurrency(tenant, 5)]
    assert (await store.admit(checks, "r1", T0)).allowed
    assert (await store.admit(checks, "r2", T0 + 0.5)).allowed  # the same window bucket
    for _ in range(2):
        await store.settle(checks, "r1", [100, 100, 1], admitted_at=T0, now=T0 + 1)
    tokens_state, budget_state, slots = await store.state(checks, T0 + 1)
    assert tokens_state.used == 100 + 600
    assert (budget_state.used, budget_state.reserved) == (100, 600)
    assert slots.used == 1


async def test_an_admission_repeated_is_applied_once(store: QuotaStore, tenant: str) -> None:
    checks = [window(tenant, 10), budget(tenant, 1000, cost=60), concurrency(tenant, 5)]
    assert (await store.admit(checks, "r1", T0)).allowed
    assert (await store.admit(checks, "r1", T0 + 0.1)).allowed
    rpm, spent, slots = await store.state(checks, T0 + 0.2)
    assert (rpm.used, spent.reserved, slots.used) == (1, 60, 1)


async def test_undoing_an_admission_that_never_ran_changes_nothing(
    store: QuotaStore, tenant: str
) -> None:
    # A gateway that lost an admission's answer settles it with nothing used. If the admission
    # never ran, that must not free what other requests hold, nor let it run afterwards.
    checks = [window(tenant, 10), budget(tenant, 1000, cost=60), concurrency(tenant, 5)]
    assert (await store.admit(checks, "other", T0)).allowed
    await store.settle(checks, "lost", [0, 0, 0], admitted_at=T0, now=T0 + 0.1)
    assert not (await store.admit(checks, "lost", T0 + 0.2)).allowed  # arrived after all
    rpm, spent, slots = await store.state(checks, T0 + 0.3)
    assert (rpm.used, spent.used, spent.reserved, slots.used) == (1, 0, 60, 1)
