"""Every Prometheus metric Sluis exports, defined in one place on an injected registry.

Labels only ever take bounded, registered values: tenant names from the tenant store, model ids
from the catalog, status classes, limit codes and modes from fixed sets. Served on a listener of
their own (`SLUIS_METRICS_PORT`), never on the tenant API.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.tenancy.ledger import CounterSeed

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
METER_FAILURE_REASONS = ("unavailable", "timeout", "error")


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sluis_requests",
            "Requests forwarded upstream, by tenant, model, status class, billing period and "
            "gateway.",
            ["tenant", "model", "status", "period", "gateway"],
            registry=r,
        )
        self.tokens = Counter(
            "sluis_tokens",
            "Tokens metered, by tenant, model, kind (prompt|completion), billing period and "
            "gateway.",
            ["tenant", "model", "kind", "period", "gateway"],
            registry=r,
        )
        self.cost = Counter(
            "sluis_cost_micro_eur",
            "What the price book charged, in micro-euros (integers: exact), by tenant, model, "
            "billing period and gateway.",
            ["tenant", "model", "period", "gateway"],
            registry=r,
        )
        # Billing counters carry the period (UTC month) their requests were metered in, so an
        # invoice reads each period's own series: exact at the boundary whenever it is scraped.
        # A period's series stay exported through the next period, then are dropped. They also
        # carry the gateway id (`SLUIS_GATEWAY_ID`, one value per gateway process) whose ledger
        # records they start from: an invoice takes each gateway's latest value, whatever scrape
        # `instance` it came from, so a restart on a new address is not counted twice.
        self.gateway = ""
        self._period_series: dict[str, set[tuple[Counter, tuple[str, ...]]]] = {}
        self.request_duration = Histogram(
            "sluis_request_duration_seconds",
            "Whole request time, by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "sluis_time_to_first_token_seconds",
            "Time to the first streamed token, by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "sluis_time_per_output_token_seconds",
            "Streamed time per output token after the first, by model.",
            ["model"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.gateway_overhead = Histogram(
            "sluis_gateway_overhead_seconds",
            "Time the gateway spends on a request before handing it upstream.",
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "sluis_inflight_requests",
            "Requests in flight upstream, by tenant and model.",
            ["tenant", "model"],
            registry=r,
        )
        self.model_info = Gauge(
            "sluis_model_info",
            "1 for every catalog model this gateway serves, with the kind of upstream serving it.",
            ["model", "upstream"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "sluis_queue_depth",
            "Requests sent to a model that have no answer yet (waiting for a replica, or in "
            "prefill), by model.",
            ["model"],
            registry=r,
        )
        self.budget_used_ratio = Gauge(
            "sluis_budget_used_ratio",
            "Share of a tenant's budget used or reserved, as of its latest admission, by tenant "
            "and budget (tokens_per_day|tokens_per_month|eur_per_month).",
            ["tenant", "budget"],
            registry=r,
        )
        self.quota_rejections = Counter(
            "sluis_quota_rejections",
            "Requests refused by a quota, by tenant and the limit that refused them.",
            ["tenant", "limit"],
            registry=r,
        )
        self.quota_admissions = Counter(
            "sluis_quota_admissions",
            "Requests admitted under quotas, by where the decision was made: the quota store, or "
            "this gateway's allowance (a share of the limits taken from the store in advance).",
            ["source"],
            registry=r,
        )
        self.quota_store_failures = Counter(
            "sluis_quota_store_failures",
            "Quota store calls that failed or timed out, by the mode applied (open admits).",
            ["mode", "operation"],
            registry=r,
        )
        self.meter_write_failures = Counter(
            "sluis_meter_write_failures",
            "Ledger writes of usage records that failed (the records are held and retried), by "
            "reason: unavailable (the database cannot be reached), timeout (a write outlasted "
            "its limit), error (anything else: a bug or a schema mismatch).",
            ["reason"],
            registry=r,
        )
        for reason in METER_FAILURE_REASONS:
            self.meter_write_failures.labels(reason)
        self.meter_pending = Gauge(
            "sluis_meter_pending_records",
            "Usage records not yet in the ledger, by where they wait (memory|spool).",
            ["where"],
            registry=r,
        )
        self.meter_set_aside = Counter(
            "sluis_meter_set_aside_records",
            "Spool lines that are not usage records (truncated by a crash, malformed), moved to "
            "the file <spool>.rejected for an operator to look at.",
            registry=r,
        )

    def register_models(self, model_ids: Sequence[str], upstream: str) -> None:
        """The catalog's models, and a zero series for each so that dashboards show an idle
        model as 0, not as absent."""
        for model in model_ids:
            self.model_info.labels(model, upstream).set(1)
            self.queue_depth.labels(model).set(0)

    def seed(self, gateway: str, totals: Sequence[CounterSeed]) -> None:
        """Label the billing counters with `gateway` and start them where that gateway's ledger
        records (`totals`) leave them, so a restart is no counter reset: Prometheus'
        increase() then loses nothing across it, and an invoice's latest value per gateway is
        its whole usage."""
        self.gateway = gateway
        for seed in sorted(totals, key=lambda seed: seed.period):
            self.count(
                seed.tenant,
                seed.model,
                seed.status,
                period=seed.period,
                requests=seed.requests,
                prompt=seed.prompt_tokens,
                completion=seed.completion_tokens,
                cost_micro_eur=seed.cost_micro_eur,
            )

    def count(
        self,
        tenant: str,
        model: str,
        status: int,
        *,
        period: str,
        requests: int,
        prompt: int,
        completion: int,
        cost_micro_eur: int,
    ) -> None:
        series = self._period_series.get(period)
        if series is None:
            series = self._start_period(period)
        gw = self.gateway
        counts = (
            (self.requests, (tenant, model, status_class(status), period, gw), requests),
            (self.tokens, (tenant, model, "prompt", period, gw), prompt),
            (self.tokens, (tenant, model, "completion", period, gw), completion),
            (self.cost, (tenant, model, period, gw), cost_micro_eur),
        )
        for counter, labels, amount in counts:
            if amount or counter is self.requests:
                counter.labels(*labels).inc(amount)
                series.add((counter, labels))

    def _start_period(self, period: str) -> set[tuple[Counter, tuple[str, ...]]]:
        """A new period's series; those of all but the latest two periods are dropped."""
        series = self._period_series[period] = set()
        for old in sorted(self._period_series)[:-2]:
            for counter, labels in self._period_series.pop(old):
                counter.remove(*labels)
        return series
