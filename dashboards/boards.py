"""Sluis' three Grafana dashboards: Tenants, Capacity, Gateway.

Every query reads metrics that exist (`sluis_*` from the gateway's listener, `ray_serve_*` and
`ray_vllm_*` from Ray's) or the recording rules in `prometheus/rules/`; a test evaluates each
one against a real Prometheus scraping the running stack. `$__rate_interval` and `$__range` are
Grafana's own variables; `$tenant` and `$model` are the dashboards' template variables.
"""

from __future__ import annotations

from dashboards.grafana import Dashboard, Panel, Query, Variable

RATE = "$__rate_interval"
TENANT = Variable("tenant", "Tenant", "label_values(sluis_requests_total, tenant)")
MODEL = Variable("model", "Model", "label_values(sluis_model_info, model)")
TENANT_MODEL = 'tenant=~"$tenant", model=~"$model"'
BY_MODEL = 'model=~"$model"'
# vLLM's engine metrics (through Ray) name the model `model_name`; Ray Serve's, the deployment.
ENGINE = 'model_name=~"$model"'
GREEN_AMBER_RED = (("green", None), ("orange", 0.8), ("red", 0.95))


def _quantiles(histogram: str, by: str, selector: str) -> tuple[Query, ...]:
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by ({by}, le) "
            f"(rate({histogram}_bucket{{{selector}}}[{RATE}])))",
            f"{{{{{by}}}}} p{round(q * 100)}",
        )
        for q in (0.5, 0.95)
    )


def tenants() -> Dashboard:
    board = Dashboard(
        uid="sluis-tenants",
        title="Sluis / Tenants",
        description="Who uses what: requests, tokens, spend, budgets and quota rejections.",
        variables=(TENANT, MODEL),
    )
    board.row(
        "Usage",
        Panel(
            "Requests per second",
            (Query(f"sum by (tenant) (rate(sluis_requests_total{{{TENANT_MODEL}}}[{RATE}]))"),),
            unit="reqps",
        ),
        Panel(
            "Tokens per second",
            (
                Query(
                    f"sum by (tenant, kind) (rate(sluis_tokens_total{{{TENANT_MODEL}}}[{RATE}]))",
                    "{{tenant}} {{kind}}",
                ),
            ),
            unit="short",
        ),
        Panel(
            "Tokens in the time range, by tenant and model",
            (
                Query(
                    "sum by (tenant, model, kind) "
                    f"(increase(sluis_tokens_total{{{TENANT_MODEL}}}[$__range]))"
                ),
            ),
            kind="table",
            width=24,
            description="Extrapolated by Prometheus: an estimate. Invoices come from "
            "`sluis invoice`, which is exact.",
        ),
    )
    board.row(
        "Spend and budgets",
        Panel(
            "Spend in the time range (EUR)",
            (
                Query(
                    "sum by (tenant) "
                    f"(increase(sluis_cost_micro_eur_total{{{TENANT_MODEL}}}[$__range])) / 1e6"
                ),
            ),
            unit="currencyEUR",
            kind="bargauge",
            description="Estimate from the price book's counters; `sluis invoice` is exact.",
        ),
        Panel(
            "Spend rate (EUR per hour)",
            (
                Query(
                    "sum by (tenant) "
                    f"(rate(sluis_cost_micro_eur_total{{{TENANT_MODEL}}}[{RATE}])) * 3600 / 1e6"
                ),
            ),
            unit="currencyEUR",
        ),
        Panel(
            "Budget left",
            (
                Query(
                    "clamp_min(1 - max by (tenant, budget) "
                    '(sluis_budget_used_ratio{tenant=~"$tenant"}), 0)',
                    "{{tenant}} {{budget}}",
                ),
            ),
            unit="percentunit",
            kind="bargauge",
            minimum=0,
            maximum=1,
            thresholds=(("red", None), ("orange", 0.1), ("green", 0.25)),
            description="Share of each tenant budget (tokens per day or month, EUR per month) "
            "not used or reserved, as of the tenant's latest request. Tenants without a budget "
            "are not listed.",
        ),
    )
    board.row(
        "Limits",
        Panel(
            "Quota rejections per second, by limit",
            (
                Query(
                    "sum by (tenant, limit) "
                    f'(rate(sluis_quota_rejections_total{{tenant=~"$tenant"}}[{RATE}]))',
                    "{{tenant}} {{limit}}",
                ),
            ),
            unit="reqps",
            failure_case=True,
        ),
        Panel(
            "Requests in flight",
            (Query(f"sum by (tenant) (sluis_inflight_requests{{{TENANT_MODEL}}})"),),
        ),
    )
    return board


def capacity() -> Dashboard:
    board = Dashboard(
        uid="sluis-capacity",
        title="Sluis / Capacity",
        description="Per model: load, latency against targets, engine queues, KV cache, replicas.",
        variables=(MODEL,),
    )
    board.row(
        "Load",
        Panel(
            "Requests per second",
            (Query(f"sum by (model) (rate(sluis_requests_total{{{BY_MODEL}}}[{RATE}]))"),),
            unit="reqps",
        ),
        Panel(
            "Output tokens per second",
            (
                Query(
                    "sum by (model) "
                    f'(rate(sluis_tokens_total{{kind="completion", {BY_MODEL}}}[{RATE}]))',
                    "{{model}} total",
                ),
                Query(
                    "sum by (model) "
                    f'(rate(sluis_tokens_total{{kind="completion", {BY_MODEL}}}[{RATE}])) '
                    f"/ on (model) model:sluis_healthy_replicas:count{{{BY_MODEL}}}",
                    "{{model}} per replica",
                ),
            ),
        ),
    )
    board.row(
        "Latency",
        Panel(
            "Time to first token",
            _quantiles("sluis_time_to_first_token_seconds", "model", BY_MODEL),
            unit="s",
        ),
        Panel(
            "Time per output token",
            _quantiles("sluis_time_per_output_token_seconds", "model", BY_MODEL),
            unit="s",
        ),
    )
    board.row(
        "Queues and engines",
        Panel(
            "Gateway queue depth",
            (Query(f"sum by (model) (sluis_queue_depth{{{BY_MODEL}}})"),),
            description="Requests sent to the model with no answer yet.",
            width=8,
        ),
        Panel(
            "Engine: running and waiting requests",
            (
                Query(
                    f"sum by (model_name) (ray_vllm_num_requests_running{{{ENGINE}}})",
                    "{{model_name}} running",
                ),
                Query(
                    f"sum by (model_name) (ray_vllm_num_requests_waiting{{{ENGINE}}})",
                    "{{model_name}} waiting",
                ),
            ),
            width=8,
        ),
        Panel(
            "Engine: KV-cache use",
            (
                Query(
                    f"max by (model_name) (ray_vllm_kv_cache_usage_perc{{{ENGINE}}})",
                    "{{model_name}}",
                ),
            ),
            unit="percentunit",
            minimum=0,
            maximum=1,
            width=8,
        ),
        Panel(
            "Healthy replicas",
            (Query(f"model:sluis_healthy_replicas:count{{{BY_MODEL}}}"),),
            kind="stat",
            thresholds=(("red", None), ("green", 1)),
            width=8,
        ),
        Panel(
            "Ongoing requests per replica (Ray Serve)",
            (
                Query(
                    "sum by (deployment) "
                    '(ray_serve_replica_processing_queries{deployment=~"model-($model)"}) '
                    "/ on (deployment) count by (deployment) "
                    '(ray_serve_deployment_replica_healthy{deployment=~"model-($model)"} == 1)',
                    "{{deployment}}",
                ),
            ),
            width=16,
        ),
    )
    return board


def gateway() -> Dashboard:
    board = Dashboard(
        uid="sluis-gateway",
        title="Sluis / Gateway",
        description="The gateway itself: errors, its own overhead, quota store health, load.",
    )
    board.row(
        "Errors",
        Panel(
            "Answers by status class",
            (Query(f"sum by (status) (rate(sluis_requests_total[{RATE}]))", "{{status}}"),),
            unit="reqps",
        ),
        Panel(
            "Error ratio (5xx)",
            (Query("sluis:sluis_requests:error_ratio_rate5m"),),
            unit="percentunit",
            thresholds=(("green", None), ("orange", 0.01), ("red", 0.05)),
        ),
        Panel(
            "Client errors by model (4xx)",
            (
                Query(
                    f'sum by (model) (rate(sluis_requests_total{{status="4xx"}}[{RATE}]))',
                ),
            ),
            unit="reqps",
            failure_case=True,
        ),
    )
    board.row(
        "Overhead and load",
        Panel(
            "Gateway overhead",
            tuple(
                Query(
                    f"histogram_quantile({q}, sum by (le) "
                    f"(rate(sluis_gateway_overhead_seconds_bucket[{RATE}])))",
                    f"p{round(q * 100)}",
                )
                for q in (0.5, 0.99)
            ),
            unit="s",
            description="Time from the request's arrival to its hand-over to the model.",
        ),
        Panel(
            "Requests in flight",
            (Query("sum(sluis_inflight_requests)", "in flight"),),
        ),
        Panel(
            "Request duration p95",
            (_quantiles("sluis_request_duration_seconds", "model", 'model=~".+"')[1],),
            unit="s",
        ),
    )
    board.row(
        "Quota store",
        Panel(
            "Store failures by mode applied",
            (
                Query(
                    f"sum by (mode, operation) (rate(sluis_quota_store_failures_total[{RATE}]))",
                    "{{mode}} {{operation}}",
                ),
            ),
            unit="ops",
            failure_case=True,
            description="mode=open: requests admitted without quotas because the store failed.",
        ),
        Panel(
            "Admissions by where decided",
            (
                Query(
                    f"sum by (source) (rate(sluis_quota_admissions_total[{RATE}]))",
                    "{{source}}",
                ),
            ),
            unit="reqps",
            description=(
                "store: one quota store call per request; allowance: admitted by the gateway "
                "from its share of a tenant's limits, without a store call (Redis only)."
            ),
        ),
        Panel(
            "Gateways up",
            (Query('sum(up{job="sluis-gateway"})', "up"),),
            kind="stat",
            thresholds=(("red", None), ("green", 1)),
        ),
    )
    return board


def every_dashboard() -> list[Dashboard]:
    return [tenants(), capacity(), gateway()]
