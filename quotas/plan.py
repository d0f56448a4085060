"""From a tenant's policy and one request to the checks the store runs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from billing.prices import MICRO, PriceBook
from quotas.checks import Check, Kind
from quotas.policy import Limits, QuotaPolicy

MINUTE_S = 60.0


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def with_costs(
    templates: list[Check], usage: Usage, prices: PriceBook, model_id: str, at: datetime
) -> list[Check]:
    """The templates (checks of a policy, costs left at zero) costed for one request."""
    money = prices.micro_eur(model_id, usage.prompt_tokens, usage.completion_tokens, at)
    return [
        Check(
            t.key,
            t.kind,
            t.code,
            t.limit,
            _cost(t.code, usage, money),
            t.span_s,
            t.period_end,
            t.limit_name,
            t.model,
        )
        for t in templates
    ]


def _cost(code: str, usage: Usage, money: int) -> int:
    if code in ("rate_limit_requests", "concurrency"):
        return 1
    if code == "budget_money":
        return money
    return usage.tokens


def plan_checks(
    policy: QuotaPolicy, *, tenant_id: str, model_id: str, now: datetime, lease_s: float
) -> list[Check]:
    """The checks a request for `model_id` runs, costs still zero (`with_costs` fills them)."""
    checks = _checks_for(policy, tenant_id, None, now, lease_s)
    model_limits = policy.for_model(model_id)
    if model_limits is not None:
        checks += _checks_for(model_limits, tenant_id, model_id, now, lease_s)
    return checks


def scoped_checks(
    policy: QuotaPolicy, *, tenant_id: str, now: datetime, lease_s: float
) -> list[tuple[str, Check]]:
    """Every check of a policy with a zero cost, per scope ("all" or a model id): for reports."""
    scoped = [("all", c) for c in _checks_for(policy, tenant_id, None, now, lease_s)]
    for model_id, limits in policy.models.items():
        scoped += [(model_id, c) for c in _checks_for(limits, tenant_id, model_id, now, lease_s)]
    return scoped


def actual_costs(
    checks: list[Check], used: Usage, prices: PriceBook, model_id: str, at: datetime
) -> list[int]:
    """What each check really cost, once the usage is known."""
    money = prices.micro_eur(model_id, used.prompt_tokens, used.completion_tokens, at)
    return [_cost(check.code, used, money) for check in checks]


def _checks_for(
    limits: Limits, tenant_id: str, model_id: str | None, now: datetime, lease_s: float
) -> list[Check]:
    """The checks of the whole tenant (`model_id` None) or of one of its models."""
    scope = "all" if model_id is None else f"m:{model_id}"
    key = f"sluis:q:{{{tenant_id}}}:{scope}"
    day, month = now.date(), now.date().replace(day=1)
    month_end = _epoch(_next_month(month))
    eur = None if limits.eur_per_month is None else round(limits.eur_per_month * MICRO)
    # (policy field, key suffix, kind, code, limit, lifetime, period end) for every limit set.
    specs: list[tuple[str, str, Kind, str, int | None, float, float]] = [
        ("requests_per_minute", "rpm", Kind.WINDOW, "rate_limit_requests",
         limits.requests_per_minute, MINUTE_S, 0.0),
        ("tokens_per_minute", "tpm", Kind.WINDOW, "rate_limit_tokens",
         limits.tokens_per_minute, MINUTE_S, 0.0),
        ("max_concurrent", "conc", Kind.CONCURRENCY, "concurrency",
         limits.max_concurrent, lease_s, 0.0),
        ("tokens_per_day", f"tpd:{day.isoformat()}", Kind.BUDGET, "budget_tokens",
         limits.tokens_per_day, lease_s, _epoch(day + timedelta(days=1))),
        ("tokens_per_month", f"tpmo:{month.isoformat()[:7]}", Kind.BUDGET, "budget_tokens",
         limits.tokens_per_month, lease_s, month_end),
        ("eur_per_month", f"eur:{month.isoformat()[:7]}", Kind.BUDGET, "budget_money",
         eur, lease_s, month_end),
    ]  # fmt: skip
    return [
        Check(f"{key}:{suffix}", kind, code, limit, 0, span, period_end, name, model_id)
        for name, suffix, kind, code, limit, span, period_end in specs
        if limit is not None
    ]


def budget_period(check: Check) -> tuple[datetime, datetime]:
    """The UTC period [start, end) a budget check counts: its day, or its month."""
    end = datetime.fromtimestamp(check.period_end, UTC)
    last_day = end - timedelta(days=1)
    if check.limit_name == "tokens_per_day":
        return last_day, end
    if check.limit_name in ("tokens_per_month", "eur_per_month"):
        return last_day.replace(day=1), end
    raise ValueError(f"not a budget check: {check.key} ({check.limit_name!r})")


def tenant_of(key: str) -> str:
    """The tenant id in a check's key (its hash tag, `{<tenant id>}`)."""
    return key[key.index("{") + 1 : key.index("}")]


def _next_month(first: date) -> date:
    return (first.replace(day=28) + timedelta(days=4)).replace(day=1)


def _epoch(day: date) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
