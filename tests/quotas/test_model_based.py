"""Hypothesis drives each store and a plain reference model with the same random admissions,
settlements and clock moves; they must agree at every step, and the limits must hold."""

from __future__ import annotations

import asyncio
import math
import secrets

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from quotas.checks import Check, Kind
from quotas.memory import MemoryStore
from quotas.redis import RedisStore
from quotas.store import QuotaStore
from tests.quotas.conftest import REDIS_URL

WINDOW_LIMIT = 100
BUDGET_LIMIT = 250
LEASE_S = 45.0


class Reference:
    """The limits as a person would state them, with no cleverness."""

    def __init__(self) -> None:
        self.window: dict[str, tuple[int, int]] = {}  # request: (bucket, cost)
        self.used = 0
        self.reservations: dict[str, tuple[int, float]] = {}  # request: (cost, expiry)

    def window_used(self, now: float) -> int:
        oldest = math.floor(now) - 60
        return sum(cost for bucket, cost in self.window.values() if bucket >= oldest)

    def reserved(self, now: float) -> int:
        return sum(cost for cost, expiry in self.reservations.values() if expiry > now)

    def admit(self, request: str, cost: int, now: float) -> bool:
        fits = (
            self.window_used(now) + cost <= WINDOW_LIMIT
            and self.used + self.reserved(now) + cost <= BUDGET_LIMIT
        )
        if fits:
            self.window[request] = (math.floor(now), cost)
            self.reservations[request] = (cost, now + LEASE_S)
        return fits

    def settle(self, request: str, actual: int, now: float) -> None:
        bucket, _ = self.window[request]
        if bucket >= math.floor(now) - 60:
            self.window[request] = (bucket, actual)
        self.reservations.pop(request)
        self.used += actual


class StoreMachine(RuleBasedStateMachine):
    make_store: staticmethod  # set by the subclasses below

    outstanding = Bundle("outstanding")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.store: QuotaStore = self.make_store()
        self.reference = Reference()
        self.tenant = f"ten_{secrets.token_hex(6)}"
        self.now = 1_800_000_000.0
        self.count = 0
        self.costs: dict[str, int] = {}

    def checks(self, cost: int) -> list[Check]:
        key = f"sluis:q:{{{self.tenant}}}:all"
        return [
            Check(f"{key}:tpm", Kind.WINDOW, "rate_limit_tokens", WINDOW_LIMIT, cost, 60.0),
            Check(
                f"{key}:tpd",
                Kind.BUDGET,
                "budget_tokens",
                BUDGET_LIMIT,
                cost,
                LEASE_S,
                period_end=self.now + 10**6,
            ),
        ]

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    @rule(seconds=st.floats(min_value=0, max_value=40, allow_nan=False))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule(target=outstanding, cost=st.integers(min_value=1, max_value=60))
    def admit(self, cost: int) -> str:
        self.count += 1
        request = f"r{self.count}"
        decision = self.run(self.store.admit(self.checks(cost), request, self.now))
        expected = self.reference.admit(request, cost, self.now)
        assert decision.allowed == expected
        if decision.allowed:
            self.costs[request] = cost
            return request
        return "refused"

    @rule(request=consumes(outstanding), share=st.floats(min_value=0, max_value=1))
    def settle(self, request: str, share: float) -> None:
        if request == "refused":
            return
        cost = self.costs.pop(request)
        actual = math.floor(cost * share)
        self.run(
            self.store.settle(
                self.checks(cost),
                request,
                [actual, actual],
                admitted_at=self._admitted_at(request),
                now=self.now,
            )
        )
        self.reference.settle(request, actual, self.now)

    def _admitted_at(self, request: str) -> float:
        # The store finds the bucket from the admission time; any instant in it will do.
        return float(self.reference.window[request][0])

    @invariant()
    def agrees_with_the_reference(self) -> None:
        window_state, budget_state = self.run(self.store.state(self.checks(0), self.now))
        assert window_state.used == self.reference.window_used(self.now)
        assert budget_state.used == self.reference.used
        assert budget_state.reserved == self.reference.reserved(self.now)
        assert budget_state.used <= BUDGET_LIMIT
        assert window_state.used <= WINDOW_LIMIT

    def teardown(self) -> None:
        self.run(self.store.aclose())
        self.loop.close()


class MemoryMachine(StoreMachine):
    make_store = staticmethod(MemoryStore)


class RedisMachine(StoreMachine):
    make_store = staticmethod(lambda: RedisStore(REDIS_URL, timeout_s=2.0))


@pytest.mark.parametrize("machine", [MemoryMachine, RedisMachine], ids=["memory", "redis"])
def test_store_matches_the_reference_model(machine: type[StoreMachine]) -> None:
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        machine, settings=settings(max_examples=60, stateful_step_count=40, deadline=None)
    )
