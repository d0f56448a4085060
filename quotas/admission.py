"""Quota admission for the gateway: reserve at admission, reconcile at the end.

Store failures are decided here and nowhere else: `open` admits without quotas, `closed` refuses
with 503. Unset, the mode is closed for tenants with a budget (money must not leak) and open for
those with rate limits only.

Leases never lapse under a live request: a heartbeat renews the reservations and slots of every
request admitted here and not yet settled, every third of the lease, so they lapse only once this
gateway is gone (or the request was dropped without a settle: the live set holds it weakly).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from billing.prices import PriceBook
from gateway.admission import AdmissionRequest, Admitted
from gateway.clock import Clock
from gateway.errors import RateLimited, StoreUnavailable
from gateway.generation import Generation
from gateway.metrics import Metrics
from gateway.tenancy.records import Tenant
from quotas.checks import Check, CheckState, Decision, Kind
from quotas.plan import Usage, actual_costs, plan_checks, scoped_checks, with_costs
from quotas.policy import QuotaPolicy, effective_policy
from quotas.store import QuotaStore, StoreFailure

log = logging.getLogger("sluis.quotas")

FailMode = Literal["open", "closed"]
_SETTLE_RETRIES_S = (0.5, 1, 2, 5, 10, 30, 60)


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Reservation:
    checks: list[Check]
    request_id: str
    model_id: str
    admitted_at: float


class QuotaAdmission:
    def __init__(
        self,
        store: QuotaStore,
        *,
        defaults: QuotaPolicy,
        prices: PriceBook,
        clock: Clock,
        metrics: Metrics,
        fail_mode: FailMode | None,
        timeout_s: float,
        lease_s: float,
        renew_every_s: float | None = None,
    ) -> None:
        self._store = store
        self._defaults = defaults
        self._prices = prices
        self._clock = clock
        self._metrics = metrics
        self._fail_mode = fail_mode
        self._timeout_s = timeout_s
        self._lease_s = lease_s
        self._renew_every_s = renew_every_s or lease_s / 3
        self._pending: set[asyncio.Task[None]] = set()
        # Admitted here and not yet settled: what the heartbeat renews.
        self._live: weakref.WeakValueDictionary[str, Reservation] = weakref.WeakValueDictionary()
        self._heartbeat: asyncio.Task[None] | None = None
        self._policies: dict[tuple[str, datetime], QuotaPolicy] = {}
        # Checks of one tenant version, model and day, costs still zero: built once per day.
        self._plans: dict[tuple[str, datetime, str, int], list[Check]] = {}

    def _plan(self, tenant: Tenant, model_id: str, now: datetime) -> list[Check]:
        """The tenant's checks for a model, built once per tenant version, model and day."""
        key = (tenant.id, tenant.updated_at, model_id, now.toordinal())
        templates = self._plans.get(key)
        if templates is None:
            if len(self._plans) > 10_000:
                self._plans.clear()
            templates = self._plans[key] = plan_checks(
                self.policy_for(tenant),
                tenant_id=tenant.id,
                model_id=model_id,
                now=now,
                lease_s=self._lease_s,
            )
        return templates

    def policy_for(self, tenant: Tenant) -> QuotaPolicy:
        """The tenant's effective policy, computed once per version of the tenant."""
        version = (tenant.id, tenant.updated_at)
        policy = self._policies.get(version)
        if policy is None:
            if len(self._policies) > 10_000:
                self._policies.clear()
            policy = self._policies[version] = effective_policy(self._defaults, tenant.quotas)
        return policy

    async def admit(self, request: AdmissionRequest) -> Admitted:
        tenant = request.principal.tenant
        model = request.model
        now = self._clock.now()
        templates = self._plan(tenant, model.id, now)
        if not templates:
            return Admitted()  # no limits: nothing to count, no store call
        generation = request.generation
        usage = Usage(generation.prompt_tokens, generation.completion_tokens)
        checks = with_costs(templates, usage, self._prices, model.id, now)
        try:
            decision = await self._store.admit(checks, request.request_id, now.timestamp())
        except (StoreFailure, TimeoutError) as exc:
            self._store_failed(self.policy_for(tenant), "admit", exc)
            return Admitted()
        if not decision.allowed:
            raise self._refusal(checks, decision, tenant.name, generation, model.id, now)
        self._metrics.quota_admissions.labels("allowance" if decision.local else "store").inc()
        self._show_budgets(tenant, checks, decision.states)
        reservation = Reservation(checks, request.request_id, model.id, now.timestamp())
        self._live[request.request_id] = reservation
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._beat())
        return Admitted(
            headers=rate_limit_headers(checks, decision.states), reservation=reservation
        )

    async def report(self, tenant_id: str, policy: QuotaPolicy) -> list[dict[str, object]]:
        """The current state of every limit of a tenant, for the admin API."""
        now = self._clock.now()
        scoped = scoped_checks(policy, tenant_id=tenant_id, now=now, lease_s=self._lease_s)
        if not scoped:
            return []
        try:
            states = await self._store.state([check for _, check in scoped], now.timestamp())
        except (StoreFailure, TimeoutError) as exc:
            raise StoreUnavailable("The quota store is unavailable; try again shortly.") from exc
        return [
            {
                "scope": scope,
                "limit": check.code,
                "kind": check.kind.value,
                "key": check.key,
                "max": check.limit,
                "used": state.used,
                "reserved": state.reserved,
                "remaining": state.remaining,
                "reset_s": round(state.reset_s, 3),
            }
            for (scope, check), state in zip(scoped, states, strict=True)
        ]

    async def settle(
        self, admitted: Admitted, *, prompt_tokens: int, completion_tokens: int
    ) -> None:
        reservation = admitted.reservation
        if not isinstance(reservation, Reservation):
            return
        if self._live.get(reservation.request_id) is reservation:
            del self._live[reservation.request_id]  # no longer renewed: the settle replaces it
        actual = actual_costs(
            reservation.checks,
            Usage(prompt_tokens, completion_tokens),
            self._prices,
            reservation.model_id,
            self._clock.now(),  # charged as metered, like the ledger
        )
        # Reconciled after the answer has gone out: the client does not wait for the store.
        task = asyncio.create_task(self._settle_with_retries(reservation, actual))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def ping(self) -> None:
        """Raises `StoreFailure` when the quota store cannot be reached."""
        await self._store.ping()

    async def drain(self) -> None:
        """Wait for the reconciliations under way."""
        while self._pending:
            await asyncio.wait(set(self._pending))

    async def renew(self) -> None:
        """One renewal round: the leases of every request admitted here and still running go
        on for another lease, one store call per plan (a tenant's checks for a model). Never
        raises: a failure is logged and counted, and the next round tries again."""
        now = self._clock.now().timestamp()
        plans: dict[tuple[tuple[str, int], ...], tuple[list[Check], list[str]]] = {}
        for request_id, reservation in list(self._live.items()):
            checks = reservation.checks  # windows have no lease: the store skips them
            key = tuple((c.key, c.cost if c.kind is Kind.CONCURRENCY else 0) for c in checks)
            plans.setdefault(key, (checks, []))[1].append(request_id)
        await asyncio.gather(*(self._renew(checks, ids, now) for checks, ids in plans.values()))

    async def _renew(self, checks: list[Check], request_ids: list[str], now: float) -> None:
        try:
            await self._store.renew(checks, request_ids, now)
        except Exception as exc:  # the heartbeat must outlive anything a store call raises
            self._metrics.quota_store_failures.labels("retry", "renew").inc()
            if isinstance(exc, StoreFailure | TimeoutError):
                log.warning(
                    "renewing quota leases failed (%s); retrying", exc or type(exc).__name__
                )
            else:
                log.exception("renewing quota leases failed; retrying")

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._renew_every_s)
            await self.renew()

    async def aclose(self, *, drain_s: float) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=drain_s)
        for task in list(self._pending):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._store.aclose()

    async def _settle(self, reservation: Reservation, actual: Sequence[int]) -> None:
        await self._store.settle(
            reservation.checks,
            reservation.request_id,
            actual,
            reservation.admitted_at,
            self._clock.now().timestamp(),
        )

    async def _settle_with_retries(self, reservation: Reservation, actual: Sequence[int]) -> None:
        for delay in (0.0, *_SETTLE_RETRIES_S):
            await asyncio.sleep(delay)
            try:
                await self._settle(reservation, actual)
                return
            except (StoreFailure, TimeoutError) as exc:
                self._metrics.quota_store_failures.labels("retry", "settle").inc()
                log.warning("quota settle failed (%s); retrying", exc or type(exc).__name__)
        # Its reservations expire with their lease; only the usage is lost to the quota.
        log.error("gave up settling quota reservation %s", reservation.request_id)

    def _store_failed(self, policy: QuotaPolicy, operation: str, exc: Exception) -> None:
        """The one place where a store failure becomes a decision."""
        mode = self._fail_mode or ("closed" if policy.has_any_budget() else "open")
        self._metrics.quota_store_failures.labels(mode, operation).inc()
        log.warning("quota store failed (%s): failing %s", exc or type(exc).__name__, mode)
        if mode == "closed":
            raise StoreUnavailable(
                "The quota store is unavailable; try again shortly.",
                retry_after=max(1, math.ceil(self._timeout_s)),
            )

    def _show_budgets(
        self, tenant: Tenant, checks: Sequence[Check], states: Sequence[CheckState]
    ) -> None:
        """The tenant-wide budgets' use on the metrics listener (dashboards, alerts)."""
        for check, state in zip(checks, states, strict=True):
            if check.kind is Kind.BUDGET and check.model is None and check.limit > 0:
                used = (state.used + state.reserved) / check.limit
                self._metrics.budget_used_ratio.labels(tenant.name, check.limit_name).set(used)

    def _refusal(
        self,
        checks: list[Check],
        decision: Decision,
        tenant: str,
        generation: Generation,
        model_id: str,
        now: datetime,
    ) -> RateLimited:
        assert decision.failed is not None
        check = checks[decision.failed]
        self._metrics.quota_rejections.labels(tenant, check.code).inc()
        state = decision.states[0] if decision.states else None
        headers = rate_limit_headers([check], [state]) if state else {}
        left = check.limit if decision.never or state is None else state.remaining
        fitting = self._fitting_max_tokens(check, generation, left, model_id, now)
        if decision.never:
            message = (
                f"This request needs {check.cost} against a limit of {check.limit} "
                f"({check.code}); it can never be admitted within that limit."
            )
        else:
            message = f"Quota exceeded ({check.code}); retry after the Retry-After interval."
        if fitting is not None:
            message += _max_tokens_advice(generation, fitting)
        return RateLimited(
            message,
            code=check.code,
            param="max_tokens" if fitting else None,
            retry_after=max(1, math.ceil(decision.retry_after_s)),
            headers=headers,
        )

    def _fitting_max_tokens(
        self, check: Check, generation: Generation, left: int, model_id: str, now: datetime
    ) -> int | None:
        """The largest `max_tokens` whose reservation fits what the refused limit has left;
        None where a smaller cap would not help (requests, concurrency, embeddings)."""
        if generation.sequences == 0 or check.code not in _TOKEN_LIMITS:
            return None
        if check.code != "budget_money":
            return generation.fitting_max_tokens(left)
        low, high = 0, generation.max_tokens  # the largest cap whose price fits, by bisection
        while low < high:
            middle = (low + high + 1) // 2
            price = self._prices.micro_eur(
                model_id, generation.prompt_tokens, middle * generation.sequences, now
            )
            low, high = (middle, high) if price <= left else (low, middle - 1)
        return low


_TOKEN_LIMITS = frozenset({"budget_tokens", "budget_money", "rate_limit_tokens"})


def _max_tokens_advice(generation: Generation, fitting: int) -> str:
    reserved = (
        f" This request reserves {generation.prompt_tokens} prompt tokens (an upper bound) "
        f"plus max_tokens {generation.max_tokens} x {generation.sequences} "
        f"sequence{'s' if generation.sequences != 1 else ''}"
    )
    if generation.defaulted:
        reserved += " (the model's default cap: the request named no max_tokens)"
    if fitting < 1:
        return reserved + "; no max_tokens fits what is left."
    return reserved + f"; max_tokens <= {fitting} fits what is left."


def rate_limit_headers(
    checks: Sequence[Check], states: Sequence[CheckState | None]
) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers, from the tightest requests and tokens windows."""
    headers: dict[str, str] = {}
    for code, suffix in (("rate_limit_requests", "requests"), ("rate_limit_tokens", "tokens")):
        pairs = [
            (c, s) for c, s in zip(checks, states, strict=True) if c.code == code and s is not None
        ]
        if not pairs:
            continue
        check, state = min(pairs, key=lambda pair: pair[1].remaining)
        headers[f"x-ratelimit-limit-{suffix}"] = str(check.limit)
        headers[f"x-ratelimit-remaining-{suffix}"] = str(state.remaining)
        headers[f"x-ratelimit-reset-{suffix}"] = f"{state.reset_s:.3f}s"
    return headers
