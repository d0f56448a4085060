"""Allowances: a gateway admits most requests from a share of a tenant's limits that it took
from the shared store, and goes to the store only to take the next share.

- A share (an allowance) is taken like one larger admission under its own id: every check of the
  request's plan at once, each with room for the request that asked plus some more.
- It is open until the end of the window bucket it was taken in (1 s for per-minute limits), so
  every request drawn from it falls in the bucket where the store counted it: windows stay exact
  sliding windows. Then it closes, and once its last request has settled it is settled in the
  store with what its requests really used; unused room goes back.
- Its size: room for as many requests as this plan saw in a bucket (for concurrency: twice the
  requests this gateway has running). Only taken while the tenant is far from its limits: at
  this gateway's pace a whole window (60 buckets) would use at most an eighth of what the store
  says is left (concurrency: the slots at most an eighth of those free). Else, and so near any
  limit, every admission goes to the store, exactly as without allowances.

So a gateway never admits more than the store granted, and limits hold across gateways. The
price: room a gateway holds unused is not available to the others until its allowance closes
(at most one bucket); with the rule above a limit can only run out meanwhile if a tenant's pace
jumps ~60-fold within the bucket, and the room held is then at most 1/480 of what was left, per
gateway.

Requests that outlive their allowance's bucket hide nothing: once it closes, the allowance is
split in the store (`QuotaStore.split`): what its finished requests used is settled, and only
what the running ones reserved stays held, under a new id, which the gateway's renewals keep
alive (`renew`: the requests' own leases are their allowance's). Each renewal round splits it
again if more of its requests ended meanwhile. A request no renewal has named for its lease is
given up (nothing used, as its lapsed lease in the store would be), and shutdown settles every
allowance, its requests still running given up the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from quotas.checks import Check, CheckState, Decision, Kind
from quotas.store import QuotaStore, StoreFailure

log = logging.getLogger("sluis.quotas")

DEFAULT_BUCKET_S = 1.0
SHARE_OF_REMAINING = 8  # a window of allowances takes at most 1/8 of what is left
WINDOW_BUCKETS_AHEAD = 60  # the pace is judged over a whole window

PlanKey = tuple[tuple[str, int], ...]
REQUESTS_WINDOW = "rate_limit_requests"  # every request costs it 1: a refusal holds for all


@dataclass
class _Allowance:
    id: str
    checks: list[Check]  # the costs are the room granted
    granted: tuple[CheckState, ...]  # the store's states right after the grant
    granted_at: float
    bucket: int
    bucket_s: float
    taken: list[int]  # per check: drawn by requests (reserved, then what they really used)
    in_flight: list[int]  # per check: what requests still running reserved
    sent: list[int]  # per check: of `taken`, what splits settled in the store already
    outstanding: int = 0
    closed: bool = False
    draws: set[str] = field(default_factory=set)  # the requests still running
    split: _Split | None = None  # sent to the store, its outcome not known yet
    split_due: bool = False  # closed with requests running: hand them to a rest of their own
    changed: bool = False  # requests ended since the store last heard of this allowance

    def is_open(self, now: float) -> bool:
        return not self.closed and math.floor(now / self.bucket_s) == self.bucket

    def fits(self, checks: Sequence[Check]) -> bool:
        return all(
            taken + check.cost <= room.cost
            for taken, check, room in zip(self.taken, checks, self.checks, strict=True)
        )

    def draw(self, checks: Sequence[Check]) -> None:
        for i, check in enumerate(checks):
            self.taken[i] += check.cost
            self.in_flight[i] += check.cost
        self.outstanding += 1

    def give_back(self, checks: Sequence[Check], actual: Sequence[int]) -> None:
        for i, (check, spent) in enumerate(zip(checks, actual, strict=True)):
            # A concurrency slot is free again; reservations become what was really used.
            self.taken[i] -= check.cost if check.kind is Kind.CONCURRENCY else check.cost - spent
            self.in_flight[i] -= check.cost
        self.outstanding -= 1
        self.changed = True

    @property
    def finished(self) -> bool:
        return self.closed and self.outstanding == 0

    def states(self) -> tuple[CheckState, ...]:
        """The store's states at the grant, as its requests have changed them since."""
        return tuple(self.correct(state, i) for i, state in enumerate(self.granted))

    def correct(self, state: CheckState, index: int) -> CheckState:
        """A store state of check `index` as it stands once this allowance is settled: unused
        room given back, settled requests' usage counted as used."""
        room, in_flight = self.checks[index], self.in_flight[index]
        taken = self.taken[index] - self.sent[index]
        if room.kind is Kind.BUDGET:
            used = state.used + taken - in_flight
            reserved = max(0, state.reserved - room.cost + in_flight)
        else:
            used, reserved = max(0, state.used - room.cost + taken), state.reserved
        return CheckState(state.limit, used, reserved, state.reset_s)

    def settlement(self) -> list[int]:
        """What its requests used, per check, beyond what splits settled already."""
        return [taken - sent for taken, sent in zip(self.taken, self.sent, strict=True)]

    def next_split(self) -> _Split | None:
        """A split now: the finished requests' usage settled, a rest holding what the running
        ones reserved (slots, reservations, their part of the window); None if it changes
        nothing in the store."""
        finished = [
            t - f - s for t, f, s in zip(self.taken, self.in_flight, self.sent, strict=True)
        ]
        if not any(finished) and self.in_flight == [check.cost for check in self.checks]:
            return None
        rest = [replace(c, cost=f) for c, f in zip(self.checks, self.in_flight, strict=True)]
        sent = [t - f for t, f in zip(self.taken, self.in_flight, strict=True)]
        return _Split(f"a-{secrets.token_hex(8)}", finished, rest, sent)


@dataclass(frozen=True, slots=True)
class _Split:
    rest_id: str
    actual: list[int]
    rest: list[Check]
    sent: list[int]


@dataclass
class _Plan:
    """What this gateway knows of one plan (a tenant's checks for a model)."""

    states: tuple[CheckState, ...] = ()  # as of the latest store answer
    allowance: _Allowance | None = None
    bucket: int = 0
    seen: int = 0  # requests in the current bucket
    seen_before: int = 0  # requests in the bucket before it
    running: int = 0  # admitted here and not yet settled
    # The store's latest refusal by the requests-per-minute window, when its retry falls due,
    # and until when this gateway repeats it.
    refused: Decision | None = None
    refused_retry_at: float = 0.0
    refused_until: float = 0.0


@dataclass
class _Draw:
    allowance: _Allowance
    checks: list[Check]
    renewed_at: float  # admitted, or last named in a renewal

    @property
    def lease_s(self) -> float:
        return max(check.span_s for check in self.checks)


class AllowanceStore:
    """A `QuotaStore` in front of a shared one (Redis): admits from allowances where it can."""

    def __init__(self, inner: QuotaStore, *, clock: Callable[[], float]) -> None:
        self._inner = inner
        self._clock = clock
        self._plans: dict[PlanKey, _Plan] = {}
        self._draws: dict[str, _Draw] = {}
        self._open: list[_Allowance] = []
        self._finished: list[_Allowance] = []
        self._unsettled: list[_Allowance] = []  # granted, not yet settled in the store
        self._flusher: asyncio.Task[None] | None = None

    async def admit(self, checks: Sequence[Check], request_id: str, now: float) -> Decision:
        self._start_flusher()
        self._close_due(now)
        plan = self._plan(checks, now)
        decision = await self._admit(plan, checks, request_id, now)
        if decision.allowed:
            plan.running += 1
        return decision

    async def _admit(
        self, plan: _Plan, checks: Sequence[Check], request_id: str, now: float
    ) -> Decision:
        if plan.refused is not None and now < plan.refused_until:
            return self._refused_again(plan, now)
        previous = plan.allowance
        if previous is not None and previous.is_open(now) and previous.fits(checks):
            return self._draw(previous, checks, request_id, now, local=True)
        if previous is not None:
            self._close(previous)  # ended, or too small for this request
        room = self._room(plan, checks)
        if room is not None:
            wanted = [
                replace(c, cost=c.cost + extra) for c, extra in zip(checks, room, strict=True)
            ]
            allowance_id = f"a-{secrets.token_hex(8)}"
            granted = await self._inner.admit(wanted, allowance_id, now)
            if granted.allowed:
                width = min((c.bucket_s for c in checks if c.kind is Kind.WINDOW), default=None)
                bucket_s = width or DEFAULT_BUCKET_S
                plan.states = granted.states
                plan.allowance = _Allowance(
                    id=allowance_id,
                    checks=wanted,
                    granted=granted.states,
                    granted_at=now,
                    bucket=math.floor(now / bucket_s),
                    bucket_s=bucket_s,
                    taken=[0] * len(wanted),
                    in_flight=[0] * len(wanted),
                    sent=[0] * len(wanted),
                )
                self._open.append(plan.allowance)
                self._unsettled.append(plan.allowance)
                return self._draw(plan.allowance, checks, request_id, now, local=False)
            plan.states = ()  # closer to a limit than this gateway knew: ask again first
        if self._finished:
            # The store decides this one alone: the room this gateway still holds idle goes
            # back first (else it could refuse a request for room it holds itself).
            await self._settle_finished(now)
        decision = await self._inner.admit(checks, request_id, now)
        if decision.allowed:
            plan.states = decision.states
        else:
            plan.states = ()  # a refusal tells one limit's state only: learn them all anew
            if decision.failed is not None and checks[decision.failed].code == REQUESTS_WINDOW:
                self._remember_refusal(plan, decision, now)
        return decision

    async def settle(
        self,
        checks: Sequence[Check],
        request_id: str,
        actual: Sequence[int],
        admitted_at: float,
        now: float,
    ) -> None:
        plan = self._plans.get(_plan_key(checks))
        if plan is not None:
            plan.running = max(0, plan.running - 1)
        draw = self._draws.pop(request_id, None)
        if draw is None:
            # Admitted by the store itself: settled there (a failure is the caller's to retry).
            await self._inner.settle(checks, request_id, actual, admitted_at, now)
            return
        draw.allowance.draws.discard(request_id)
        draw.allowance.give_back(draw.checks, actual)
        if draw.allowance.finished:
            self._finished.append(draw.allowance)
            try:
                await self._settle_finished(now)
            except (StoreFailure, TimeoutError) as exc:
                # Kept: the flusher tries again. The request itself is settled here, once.
                log.warning("settling a quota allowance failed (%s); retrying", exc)

    async def renew(self, checks: Sequence[Check], request_ids: Sequence[str], now: float) -> None:
        """Renew the requests the store admitted itself there, and the allowances the others
        drew from, each once (split anew where more of its requests have ended)."""
        own: list[str] = []
        allowances: dict[int, _Allowance] = {}
        for request_id in request_ids:
            draw = self._draws.get(request_id)
            if draw is None:
                own.append(request_id)
            else:
                draw.renewed_at = now
                allowances[id(draw.allowance)] = draw.allowance
        calls = [self._renew_allowance(allowance, now) for allowance in allowances.values()]
        if own:
            calls.append(self._inner.renew(checks, own, now))
        for outcome in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome

    async def split(
        self,
        checks: Sequence[Check],
        request_id: str,
        actual: Sequence[int],
        rest_id: str,
        rest: Sequence[int],
        now: float,
    ) -> None:
        """Of what the store admitted itself (allowances split themselves)."""
        await self._inner.split(checks, request_id, actual, rest_id, rest, now)

    async def flush(self, now: float, *, everything: bool = False) -> None:
        """Close the allowances whose bucket has ended (all, with `everything`), give up the
        requests no renewal named for their lease, settle the finished allowances in the store
        and split those closed with requests still running."""
        self._close_due(now, everything=everything)
        self._expire_stale(now)
        await self._settle_finished(now)
        for allowance in [a for a in self._unsettled if a.split_due or a.split is not None]:
            if not allowance.finished:
                await self._split(allowance, now)

    async def state(self, checks: Sequence[Check], now: float) -> list[CheckState]:
        """The store's states, corrected for this gateway's allowances not yet settled there
        (exact with one gateway; other gateways' allowances show as held for a moment)."""
        states = await self._inner.state(checks, now)
        corrected = []
        for check, state in zip(checks, states, strict=True):
            for allowance in self._unsettled:
                for index, room in enumerate(allowance.checks):
                    if room.key == check.key:
                        state = allowance.correct(state, index)
            corrected.append(state)
        return corrected

    async def ping(self) -> None:
        await self._inner.ping()

    async def aclose(self) -> None:
        """Settle every allowance: the requests still running (this gateway no longer renews
        them) are given up, their reservations and slots released."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        now = self._clock()
        self._close_due(now, everything=True)
        running = [a for a in self._unsettled if not a.finished]
        if running:
            log.warning(
                "%d quota allowances settled at shutdown with %d requests still running: "
                "their reservations and slots released",
                len(running),
                sum(len(a.draws) for a in running),
            )
            for allowance in running:
                for request_id in list(allowance.draws):
                    self._give_up(request_id)
        try:
            await self._settle_finished(now)
        except (StoreFailure, TimeoutError) as exc:
            # Their reservations and slots lapse after their lease, like any unsettled request.
            log.error("%d quota allowances left unsettled: %s", len(self._finished), exc)
        await self._inner.aclose()

    def _plan(self, checks: Sequence[Check], now: float) -> _Plan:
        key = _plan_key(checks)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 10_000:
                self._plans = {
                    k: p
                    for k, p in self._plans.items()
                    if p.running or (p.allowance is not None and not p.allowance.closed)
                }
            plan = self._plans[key] = _Plan()
        bucket = math.floor(now / DEFAULT_BUCKET_S)
        if bucket != plan.bucket:
            plan.seen_before = plan.seen if bucket == plan.bucket + 1 else 0
            plan.bucket, plan.seen = bucket, 0
        plan.seen += 1
        return plan

    @staticmethod
    def _room(plan: _Plan, checks: Sequence[Check]) -> list[int] | None:
        """Room to take beyond this request, per check; None when the tenant is too close to
        a limit for an allowance (or too quiet for one to be worth it)."""
        expected = max(plan.seen, plan.seen_before)
        if expected < 2 or len(plan.states) != len(checks):
            return None
        room = []
        for check, state in zip(checks, plan.states, strict=True):
            left = state.remaining - check.cost
            if check.kind is Kind.CONCURRENCY:
                extra = check.cost * 2 * (plan.running + 1)  # slots are used again
                needed = extra
            else:
                extra = check.cost * expected
                needed = extra * WINDOW_BUCKETS_AHEAD
            if needed * SHARE_OF_REMAINING > left:
                return None
            room.append(extra)
        return room

    @staticmethod
    def _remember_refusal(plan: _Plan, decision: Decision, now: float) -> None:
        """A full requests window stays full until its old buckets leave it (other gateways
        only add to it), so this gateway refuses the plan's next requests itself until then,
        at most to the end of the current bucket: a tenant hammering past its rate limit costs
        the store one call per gateway and second, not one per request."""
        bucket_end = (math.floor(now / DEFAULT_BUCKET_S) + 1) * DEFAULT_BUCKET_S
        plan.refused = decision
        plan.refused_retry_at = now + decision.retry_after_s
        plan.refused_until = min(plan.refused_retry_at, bucket_end)

    @staticmethod
    def _refused_again(plan: _Plan, now: float) -> Decision:
        assert plan.refused is not None
        return Decision(
            allowed=False,
            states=plan.refused.states,
            failed=plan.refused.failed,
            retry_after_s=max(0.0, plan.refused_retry_at - now),
            local=True,
        )

    def _draw(
        self,
        allowance: _Allowance,
        checks: Sequence[Check],
        request_id: str,
        now: float,
        *,
        local: bool,
    ) -> Decision:
        allowance.draw(checks)
        allowance.draws.add(request_id)
        self._draws[request_id] = _Draw(allowance, list(checks), now)
        return Decision(allowed=True, states=allowance.states(), local=local)

    def _close(self, allowance: _Allowance) -> None:
        if allowance.closed:
            return
        allowance.closed = True
        self._open.remove(allowance)
        if allowance.finished:
            self._finished.append(allowance)
        else:
            allowance.split_due = True

    def _expire_stale(self, now: float) -> None:
        """Give up the requests of closed allowances that no renewal named for their lease:
        their gateway lost them without a settle (the store's own lease would lapse too)."""
        stale = [
            request_id
            for allowance in self._unsettled
            if allowance.closed
            for request_id in allowance.draws
            if now - self._draws[request_id].renewed_at > self._draws[request_id].lease_s
        ]
        if stale:
            log.warning("%d quota requests drawn from allowances not renewed: given up", len(stale))
        for request_id in stale:
            self._give_up(request_id)

    def _give_up(self, request_id: str) -> None:
        """As a lapsed lease: nothing used, still counted in the windows as admitted."""
        draw = self._draws.pop(request_id)
        plan = self._plans.get(_plan_key(draw.checks))
        if plan is not None:
            plan.running = max(0, plan.running - 1)
        allowance = draw.allowance
        allowance.draws.discard(request_id)
        allowance.give_back(
            draw.checks, [c.cost if c.kind is Kind.WINDOW else 0 for c in draw.checks]
        )
        if allowance.finished:
            self._finished.append(allowance)

    async def _renew_allowance(self, allowance: _Allowance, now: float) -> None:
        if allowance.finished:
            return  # being settled
        due = allowance.split_due or allowance.changed or allowance.split is not None
        if allowance.closed and due and await self._split(allowance, now):
            return  # the rest's lease starts now
        await self._inner.renew(allowance.checks, [allowance.id], now)

    async def _split(self, allowance: _Allowance, now: float) -> bool:
        """Settle what a closed allowance's finished requests used; only what its running ones
        reserved stays held, under a new id. A split whose outcome is not known is sent again
        as it was (the store applies it once) before anything else of its allowance. False
        when there was nothing to split."""
        split = allowance.split
        if split is None:
            allowance.split_due = allowance.changed = False
            split = allowance.split = allowance.next_split()
            if split is None:
                return False
        rest = [check.cost for check in split.rest]
        await self._inner.split(
            allowance.checks, allowance.id, split.actual, split.rest_id, rest, now
        )
        if allowance.split is split:
            allowance.id, allowance.checks, allowance.sent = split.rest_id, split.rest, split.sent
            allowance.split = None
        return True

    def _close_due(self, now: float, *, everything: bool = False) -> None:
        for allowance in [a for a in self._open if everything or not a.is_open(now)]:
            self._close(allowance)

    async def _settle_finished(self, now: float) -> None:
        while self._finished:
            allowance = self._finished.pop(0)  # taken off first: concurrent callers never share one
            try:
                if allowance.split is not None:
                    await self._split(allowance, now)
                await self._inner.settle(
                    allowance.checks,
                    allowance.id,
                    allowance.settlement(),
                    allowance.granted_at,
                    now,
                )
            except BaseException:
                self._finished.insert(0, allowance)
                raise
            self._unsettled.remove(allowance)

    def _start_flusher(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_every_bucket())

    async def _flush_every_bucket(self) -> None:
        while True:
            await asyncio.sleep(DEFAULT_BUCKET_S / 2)
            try:
                await self.flush(self._clock())
            except (StoreFailure, TimeoutError) as exc:
                log.warning("settling quota allowances failed (%s); retrying", exc)


def _plan_key(checks: Sequence[Check]) -> PlanKey:
    return tuple((check.key, check.limit) for check in checks)
