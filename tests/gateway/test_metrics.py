"""Metrics on their own listener, labelled only with registered tenants and catalog models."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import httpx
from prometheus_client.parser import text_string_to_metric_families

from billing.periods import period_of
from billing.prices import ModelPrice
from gateway.metrics import Metrics
from gateway.settings import FileConfig
from gateway.tokens import count_prompt_tokens
from gateway.upstreams.base import Endpoint
from loadtests.processes import free_port
from tests.conftest import GatewayFactory


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _period() -> str:
    return period_of(datetime.now(UTC))


def test_requests_tokens_and_latencies_are_exported(gateway_factory: GatewayFactory) -> None:
    port = free_port()
    gateway = gateway_factory(metrics_port=port)
    key = gateway.create_tenant("acme")
    headers = {"authorization": f"Bearer {key}"}
    chat = {
        "model": "fake-chat",
        "messages": [{"role": "user", "content": "a b c"}],
        "max_tokens": 5,
    }
    for body in (chat, chat, {**chat, "stream": True}, {**chat, "model": "gpt-9"}):
        httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers)
    records = gateway.records()
    samples = scrape(f"http://127.0.0.1:{port}/metrics")
    gateway_id = ("gateway", gateway.state.gateway_id)  # the billing counters' series' owner
    labels = (
        gateway_id,
        ("model", "fake-chat"),
        ("period", _period()),
        ("status", "2xx"),
        ("tenant", "acme"),
    )
    assert samples[("sluis_requests_total", labels)] == 3
    for kind in ("prompt", "completion"):
        key_labels = (
            gateway_id,
            ("kind", kind),
            ("model", "fake-chat"),
            ("period", _period()),
            ("tenant", "acme"),
        )
        assert samples[("sluis_tokens_total", key_labels)] == sum(
            r[f"{kind}_tokens"] for r in records
        )
    assert samples[("sluis_time_to_first_token_seconds_count", (("model", "fake-chat"),))] == 1
    assert samples[("sluis_request_duration_seconds_count", (("model", "fake-chat"),))] == 3
    assert samples[("sluis_gateway_overhead_seconds_count", ())] == 3
    assert samples[("sluis_inflight_requests", (("model", "fake-chat"), ("tenant", "acme")))] == 0
    # A model that does not exist creates no series.
    assert not [name for name, labels in samples if ("model", "gpt-9") in labels]
    # Metrics are never served on the tenant API's listener.
    assert httpx.get(f"{gateway.url}/metrics").status_code == 404


def test_a_taken_metrics_port_fails_start_up_clearly(gateway_factory: GatewayFactory) -> None:
    import asyncio

    import pytest

    from gateway.app import create_app
    from gateway.settings import ConfigError

    port = free_port()
    first = gateway_factory(metrics_port=port)
    app = create_app(
        first.settings.model_copy(
            update={"state_dir": first.settings.state_dir, "database_url": "sqlite+aiosqlite://"}
        )
    )

    async def start() -> None:
        async with app.router.lifespan_context(app):
            pass

    with pytest.raises(ConfigError, match="SLUIS_METRICS_PORT"):
        asyncio.run(start())


def test_counters_survive_a_restart_seeded_from_this_gateways_ledger(
    gateway_factory: GatewayFactory,
) -> None:
    chat = {"model": "fake-chat", "messages": [{"role": "user", "content": "a b"}], "max_tokens": 3}
    labels = (
        ("gateway", "gw-a"),
        ("model", "fake-chat"),
        ("period", _period()),
        ("status", "2xx"),
        ("tenant", "acme"),
    )
    completion = (
        ("gateway", "gw-a"),
        ("kind", "completion"),
        ("model", "fake-chat"),
        ("period", _period()),
        ("tenant", "acme"),
    )

    priced = FileConfig(
        prices={"fake-chat": ModelPrice(prompt_eur_per_million=1.5, completion_eur_per_million=4.5)}
    )
    first = gateway_factory(metrics_port=free_port(), gateway_id="gw-a", file=priced)
    key = first.create_tenant("acme")
    for _ in range(2):
        httpx.post(
            f"{first.url}/v1/chat/completions",
            json=chat,
            headers={"authorization": f"Bearer {key}"},
        )
    first.stop()  # drains the ledger

    port = free_port()
    again = gateway_factory(metrics_port=port, gateway_id="gw-a", file=priced)
    samples = scrape(f"http://127.0.0.1:{port}/metrics")
    assert samples[("sluis_requests_total", labels)] == 2  # no reset to 0
    assert samples[("sluis_tokens_total", completion)] == 6
    # 2 requests x (2 prompt x 1.5 + 3 completion x 4.5) micro-euros, as the ledger charged.
    cost = (("gateway", "gw-a"), ("model", "fake-chat"), ("period", _period()), ("tenant", "acme"))
    assert (
        samples[("sluis_cost_micro_eur_total", cost)]
        == 2 * 17
        == sum(r["cost_micro_eur"] for r in again.records())
    )
    [total] = again.admin("GET", "/usage").json()["data"]
    assert total["cost_eur"] == 34 / 1_000_000
    httpx.post(
        f"{again.url}/v1/chat/completions", json=chat, headers={"authorization": f"Bearer {key}"}
    )
    assert scrape(f"http://127.0.0.1:{port}/metrics")[("sluis_requests_total", labels)] == 3
    again.stop()

    # Another replica sharing the database counts only its own requests.
    other_port = free_port()
    gateway_factory(metrics_port=other_port, gateway_id="gw-b")
    samples = scrape(f"http://127.0.0.1:{other_port}/metrics")
    assert not [labels for name, labels in samples if name == "sluis_requests_total"]


def test_queue_depth_counts_requests_waiting_for_their_answer(
    gateway_factory: GatewayFactory,
) -> None:
    port = free_port()
    gateway = gateway_factory(metrics_port=port)
    key = gateway.create_tenant("acme")
    metrics = f"http://127.0.0.1:{port}/metrics"
    depth = ("sluis_queue_depth", (("model", "fake-chat"),))
    info = ("sluis_model_info", (("model", "fake-chat"), ("upstream", "http")))
    assert scrape(metrics)[depth] == 0  # every catalog model has its series from the start
    assert scrape(metrics)[info] == 1
    slow = {
        "model": "fake-chat",
        "max_tokens": 3,
        "messages": [{"role": "user", "content": "a [[delay:0.5]]"}],
    }
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(
            httpx.post,
            f"{gateway.url}/v1/chat/completions",
            json=slow,
            headers={"authorization": f"Bearer {key}"},
            timeout=30,
        )
        seen = set()
        while not answer.done():
            seen.add(scrape(metrics)[depth])
        assert answer.result().status_code == 200
    assert 1 in seen
    assert scrape(metrics)[depth] == 0


def test_budget_use_is_exported_per_tenant(gateway_factory: GatewayFactory) -> None:
    port = free_port()
    gateway = gateway_factory(metrics_port=port)
    key = gateway.create_tenant("acme")
    patched = gateway.admin("PATCH", "/tenants/acme", json={"quotas": {"tokens_per_day": 1000}})
    assert patched.status_code == 200, patched.text
    chat = {"model": "fake-chat", "max_tokens": 5, "messages": [{"role": "user", "content": "a b"}]}
    answer = httpx.post(
        f"{gateway.url}/v1/chat/completions", json=chat, headers={"authorization": f"Bearer {key}"}
    )
    assert answer.status_code == 200
    samples = scrape(f"http://127.0.0.1:{port}/metrics")
    ratio = samples[("sluis_budget_used_ratio", (("budget", "tokens_per_day"), ("tenant", "acme")))]
    # As of its admission: nothing used yet; its prompt (as the gateway counts it for the
    # reservation) and max_tokens reserved.
    model = gateway.state.catalog.resolve("fake-chat")
    reserved = count_prompt_tokens(Endpoint.CHAT, chat, model.tokenizer) + 5
    assert ratio == reserved / 1000
    budgets = [labels for name, labels in samples if name == "sluis_budget_used_ratio"]
    assert len(budgets) == 1  # tenants without a budget, and rate limits, have no series


def test_billing_series_of_a_period_are_kept_through_the_next_then_dropped() -> None:
    metrics = Metrics()
    metrics.seed("gw-1", ())  # nothing metered yet: only the gateway label

    def periods() -> set[str]:
        return {
            sample.labels["period"]
            for family in metrics.registry.collect()
            for sample in family.samples
            if "period" in sample.labels
        }

    for period in ("2026-10", "2026-11"):
        metrics.count(
            "acme", "m", 200, period=period, requests=1, prompt=2, completion=3, cost_micro_eur=4
        )
    assert periods() == {"2026-10", "2026-11"}
    metrics.count(
        "acme", "m", 200, period="2026-12", requests=1, prompt=1, completion=1, cost_micro_eur=1
    )
    assert periods() == {"2026-11", "2026-12"}  # November's final values stay for December
    value = metrics.registry.get_sample_value
    labels = {
        "tenant": "acme",
        "model": "m",
        "kind": "completion",
        "period": "2026-11",
        "gateway": "gw-1",
    }
    assert value("sluis_tokens_total", labels) == 3
