"""The in-process quota store: the embedded default, for one gateway process only."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from quotas.checks import WINDOW_BUCKETS, Check, CheckState, Decision, Kind, window_retry_after


@dataclass
class _Budget:
    used: int = 0
    reservations: dict[str, tuple[int, float]] = field(default_factory=dict)  # id: cost, expiry

    def reserved(self, now: float) -> int:
        for request_id, (_, expiry) in list(self.reservations.items()):
            if expiry <= now:
                del self.reservations[request_id]
        return sum(cost for cost, _ in self.reservations.values())


class MemoryStore:
    def __init__(self) -> None:
        self._windows: dict[str, dict[int, int]] = {}
        self._budgets: dict[str, _Budget] = {}
        self._leases: dict[str, dict[str, float]] = {}

    async def admit(self, checks: Sequence[Check], request_id: str, now: float) -> Decision:
        states = []
        for index, check in enumerate(checks):
            state, retry_after = self._evaluate(check, now)
            if state.used + state.reserved + check.cost > check.limit:
                return Decision(
                    allowed=False,
                    failed=index,
                    retry_after_s=retry_after,
                    never=check.cost > check.limit,
                    states=(state,),
                )
            states.append(state)
        for check in checks:
            self._apply(check, request_id, now)
        return Decision(
            allowed=True,
            states=tuple(
                CheckState(
                    s.limit,
                    s.used + c.cost if c.kind is not Kind.BUDGET else s.used,
                    s.reserved + c.cost if c.kind is Kind.BUDGET else s.reserved,
                    s.reset_s,
                )
                for s, c in zip(states, checks, strict=True)
            ),
        )

    async def settle(
        self,
        checks: Sequence[Check],
        request_id: str,
        actual: Sequence[int],
        admitted_at: float,
        now: float,
    ) -> None:
        for check, spent in zip(checks, actual, strict=True):
            if check.kind is Kind.WINDOW:
                buckets = self._windows.get(check.key, {})
                index = math.floor(admitted_at / check.bucket_s)
                if index in buckets:
                    buckets[index] = max(0, buckets[index] + spent - check.cost)
            elif check.kind is Kind.BUDGET:
                budget = self._budgets.setdefault(check.key, _Budget())
                budget.reservations.pop(request_id, None)
                budget.used += spent
            else:
                self._leases.get(check.key, {}).pop(request_id, None)

    async def state(self, checks: Sequence[Check], now: float) -> list[CheckState]:
        return [self._evaluate(check, now)[0] for check in checks]

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def _evaluate(self, check: Check, now: float) -> tuple[CheckState, float]:
        if check.kind is Kind.WINDOW:
            buckets = self._windows.setdefault(check.key, {})
            oldest = math.floor(now / check.bucket_s) - WINDOW_BUCKETS
            for index in [i for i in buckets if i < oldest]:
                del buckets[index]
            used = sum(buckets.values())
            reset = (min(buckets) + WINDOW_BUCKETS + 1) * check.bucket_s - now if buckets else 0.0
            return (
                CheckState(check.limit, used, 0, reset),
                window_retry_after(buckets, check, used, now),
            )
        if check.kind is Kind.BUDGET:
            budget = self._budgets.setdefault(check.key, _Budget())
            reset = max(0.0, check.period_end - now)
            return CheckState(check.limit, budget.used, budget.reserved(now), reset), reset
        leases = self._leases.setdefault(check.key, {})
        for request_id in [r for r, expiry in leases.items() if expiry <= now]:
            del leases[request_id]
        return CheckState(check.limit, len(leases), 0, 0.0), 1.0

    def _apply(self, check: Check, request_id: str, now: float) -> None:
        if check.kind is Kind.WINDOW:
            buckets = self._windows.setdefault(check.key, {})
            index = math.floor(now / check.bucket_s)
            buckets[index] = buckets.get(index, 0) + check.cost
        elif check.kind is Kind.BUDGET:
            budget = self._budgets.setdefault(check.key, _Budget())
            budget.reservations[request_id] = (check.cost, now + check.span_s)
        else:
            self._leases.setdefault(check.key, {})[request_id] = now + check.span_s
