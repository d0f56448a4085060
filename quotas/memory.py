"""The in-process quota store: the embedded default, for one gateway process only.

Every check is O(1) amortised: windows keep a running sum beside their buckets, budgets and
concurrency a running total beside a heap of lease expiries.

Exactly once, like the Redis store: an admission leaves a record under its request id (when it
was counted), the first settle takes it, so a repeated settle changes nothing and an admission
repeated is applied once; a settle that finds no record leaves a mark that refuses the admission
should it come after.

Budgets start from the usage ledger: a budget key this process has not counted yet (after a
start, or in a new day or month) is seeded at its first admission with what its period used
(`quotas/seeding.py`), so a restart does not hand a tenant its budget again.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from quotas.checks import WINDOW_BUCKETS, Check, CheckState, Decision, Kind, window_retry_after
from quotas.store import SeedSource

PERIOD_KEPT_S = 2678400.0  # as the Redis store keeps a budget a month after its period


@dataclass
class _Window:
    buckets: deque[list[int]] = field(default_factory=deque)  # [index, count], oldest first
    total: int = 0

    def expire(self, oldest: int) -> None:
        while self.buckets and self.buckets[0][0] < oldest:
            self.total -= self.buckets.popleft()[1]

    def add(self, index: int, amount: int) -> None:
        if self.buckets and self.buckets[-1][0] == index:
            self.buckets[-1][1] += amount
        else:
            self.buckets.append([index, amount])
        self.total += amount

    def adjust(self, index: int, delta: int) -> None:
        for bucket in reversed(self.buckets):
            if bucket[0] == index:
                updated = max(0, bucket[1] + delta)
                self.total += updated - bucket[1]
                bucket[1] = updated
                return


@dataclass
class _Leases:
    """Reservations (budgets) or slots (concurrency) that lapse at their expiry."""

    live: dict[str, tuple[int, float]] = field(default_factory=dict)  # request: amount, expiry
    expiries: list[tuple[float, str]] = field(default_factory=list)
    total: int = 0
    used: int = 0  # budgets: what settled requests consumed
    seeded: bool = False  # budgets: `used` starts from the ledger's count (`MemoryStore._seed`)

    def expire(self, now: float) -> None:
        while self.expiries and self.expiries[0][0] <= now:
            expiry, request = heapq.heappop(self.expiries)
            held = self.live.get(request)
            if held is not None and held[1] == expiry:
                del self.live[request]
                self.total -= held[0]

    def hold(self, request: str, amount: int, expiry: float) -> None:
        self.release(request)
        self.live[request] = (amount, expiry)
        self.total += amount
        heapq.heappush(self.expiries, (expiry, request))

    def release(self, request: str) -> None:
        held = self.live.pop(request, None)
        if held is not None:
            self.total -= held[0]

    def extend(self, request: str, expiry: float) -> None:
        held = self.live.get(request)
        if held is not None and held[1] < expiry:
            self.live[request] = (held[0], expiry)
            heapq.heappush(self.expiries, (expiry, request))  # the old entry is skipped


@dataclass
class _Records:
    """Per request id: when its admission was counted, or None once a settle came first."""

    live: dict[str, tuple[float | None, float]] = field(default_factory=dict)  # at, expiry
    expiries: list[tuple[float, str]] = field(default_factory=list)

    def expire(self, now: float) -> None:
        while self.expiries and self.expiries[0][0] <= now:
            expiry, request = heapq.heappop(self.expiries)
            held = self.live.get(request)
            if held is not None and held[1] == expiry:
                del self.live[request]

    def put(self, request: str, at: float | None, expiry: float) -> None:
        self.live[request] = (at, expiry)
        heapq.heappush(self.expiries, (expiry, request))
        if len(self.expiries) > 2 * len(self.live) + 1024:
            # Settled records leave their expiry behind (a budget's lives a month): compact.
            self.expiries = [(expiry, request) for request, (_, expiry) in self.live.items()]
            heapq.heapify(self.expiries)


class MemoryStore:
    def __init__(self, *, seeds: SeedSource | None = None) -> None:
        self._windows: dict[str, _Window] = {}
        self._leases: dict[str, _Leases] = {}
        self._records = _Records()
        self._seeds = seeds

    async def admit(self, checks: Sequence[Check], request_id: str, now: float) -> Decision:
        await self._seed(checks)
        self._records.expire(now)
        record = self._records.live.get(request_id)
        if record is not None:
            # Applied already, or given up by its caller (settled first): never applied again.
            now_states = tuple(self._evaluate(check, now) for check in checks)
            if record[0] is None:
                return Decision(allowed=False, failed=0, states=now_states[:1])
            return Decision(allowed=True, states=now_states)
        states = []
        for index, check in enumerate(checks):
            state = self._evaluate(check, now)
            if state.used + state.reserved + check.cost > check.limit:
                return Decision(
                    allowed=False,
                    failed=index,
                    retry_after_s=self._retry_after(check, state, now),
                    never=check.cost > check.limit,
                    states=(state,),
                )
            states.append(state)
        admitted = []
        self._records.put(request_id, now, now + max(_lifetime(c, now) for c in checks))
        for check, state in zip(checks, states, strict=True):
            self._apply(check, request_id, now)
            if check.kind is Kind.BUDGET:
                admitted.append(
                    CheckState(state.limit, state.used, state.reserved + check.cost, state.reset_s)
                )
            else:
                admitted.append(
                    CheckState(state.limit, state.used + check.cost, state.reserved, state.reset_s)
                )
        return Decision(allowed=True, states=tuple(admitted))

    async def settle(
        self,
        checks: Sequence[Check],
        request_id: str,
        actual: Sequence[int],
        admitted_at: float,
        now: float,
    ) -> None:
        self._records.expire(now)
        record = self._records.live.get(request_id)
        if record is None:
            # Never admitted (or long ago): keep the admission from applying should it come.
            self._records.put(request_id, None, now + max(check.span_s for check in checks))
            return
        counted_at = record[0]
        if counted_at is None:
            return
        del self._records.live[request_id]
        for check, spent in zip(checks, actual, strict=True):
            if check.kind is Kind.WINDOW:
                window = self._windows.get(check.key)
                if window is not None and spent != check.cost:
                    window.adjust(math.floor(counted_at / check.bucket_s), spent - check.cost)
            elif check.kind is Kind.BUDGET:
                budget = self._leases.setdefault(check.key, _Leases())
                budget.release(request_id)
                budget.used += spent
            else:
                self._leases.setdefault(check.key, _Leases()).release(request_id)

    async def renew(self, checks: Sequence[Check], request_ids: Sequence[str], now: float) -> None:
        self._records.expire(now)
        leased = [check for check in checks if check.kind is not Kind.WINDOW]
        if not leased:
            return
        longest = now + max(check.span_s for check in leased)
        for request_id in request_ids:
            record = self._records.live.get(request_id)
            if record is None or record[0] is None:
                continue  # settled, never admitted, or given up
            for check in leased:
                leases = self._leases.get(check.key)
                if leases is not None:
                    leases.expire(now)
                    leases.extend(request_id, now + check.span_s)
            if record[1] < longest:  # its settle must still find it
                self._records.put(request_id, record[0], longest)

    async def split(
        self,
        checks: Sequence[Check],
        request_id: str,
        actual: Sequence[int],
        rest_id: str,
        rest: Sequence[int],
        now: float,
    ) -> None:
        self._records.expire(now)
        counted_at, lasts = self._records.live.get(request_id, (None, 0.0))
        if counted_at is None:
            await self.settle(checks, request_id, actual, now, now)  # nothing to split
            return
        live = set()
        for check in checks:
            if check.kind is not Kind.WINDOW:
                leases = self._leases.setdefault(check.key, _Leases())
                leases.expire(now)
                if request_id in leases.live:
                    live.add(check.key)
        # The rest stays counted in the window bucket; the other holdings move to it.
        finished = [
            spent + part if check.kind is Kind.WINDOW else spent
            for check, spent, part in zip(checks, actual, rest, strict=True)
        ]
        await self.settle(checks, request_id, finished, counted_at, now)
        for check, part in zip(checks, rest, strict=True):
            if part and check.key in live:
                self._leases[check.key].hold(rest_id, part, now + check.span_s)
                lasts = max(lasts, now + check.span_s)
        self._records.put(rest_id, counted_at, lasts)

    async def state(self, checks: Sequence[Check], now: float) -> list[CheckState]:
        await self._seed(checks)
        return [self._evaluate(check, now) for check in checks]

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def _seed(self, checks: Sequence[Check]) -> None:
        """Budgets this process has not counted yet (since its start, or a new period) start
        from what the ledger says their period used. The only await of an admission, before it
        reads anything: evaluating and applying stay one step."""
        leases = self._leases
        unseeded = [
            check
            for check in checks
            if check.kind is Kind.BUDGET and not (check.key in leases and leases[check.key].seeded)
        ]
        if not unseeded:
            return
        used = [0] * len(unseeded) if self._seeds is None else await self._seeds(unseeded)
        for check, value in zip(unseeded, used, strict=True):
            budget = leases.setdefault(check.key, _Leases())
            if not budget.seeded:  # else seeded meanwhile, for an admission that met this one
                budget.seeded = True
                budget.used = max(budget.used, value)

    def _evaluate(self, check: Check, now: float) -> CheckState:
        if check.kind is Kind.WINDOW:
            window = self._windows.setdefault(check.key, _Window())
            window.expire(math.floor(now / check.bucket_s) - WINDOW_BUCKETS)
            reset = 0.0
            if window.buckets:
                reset = (window.buckets[0][0] + WINDOW_BUCKETS + 1) * check.bucket_s - now
            return CheckState(check.limit, window.total, 0, reset)
        leases = self._leases.setdefault(check.key, _Leases())
        leases.expire(now)
        if check.kind is Kind.BUDGET:
            return CheckState(
                check.limit, leases.used, leases.total, max(0.0, check.period_end - now)
            )
        return CheckState(check.limit, leases.total, 0, 0.0)

    def _retry_after(self, check: Check, state: CheckState, now: float) -> float:
        if check.kind is Kind.WINDOW:
            buckets = {index: count for index, count in self._windows[check.key].buckets}
            return window_retry_after(buckets, check, state.used, now)
        if check.kind is Kind.BUDGET:
            return state.reset_s
        return 1.0

    def _apply(self, check: Check, request_id: str, now: float) -> None:
        if check.kind is Kind.WINDOW:
            self._windows[check.key].add(math.floor(now / check.bucket_s), check.cost)
        else:
            self._leases[check.key].hold(request_id, check.cost, now + check.span_s)


def _lifetime(check: Check, now: float) -> float:
    """How long what an admission holds for a check lives (and so its record)."""
    if check.kind is Kind.WINDOW:
        return check.span_s + 2 * check.bucket_s
    if check.kind is Kind.BUDGET:
        # A settle after the lease still counts the usage.
        return max(check.span_s, check.period_end + PERIOD_KEPT_S - now)
    return check.span_s
