"""Quotas through the real gateway: status, headers, error shape, exact accounting."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from billing.prices import ModelPrice
from gateway.settings import FileConfig, ModelConfig
from loadtests.processes import free_port
from quotas.policy import QuotaPolicy
from tests.clients import leave_mid_stream
from tests.conftest import GatewayFactory, RunningGateway
from tests.gateway.errors import assert_openai_error
from tests.quotas.conftest import REDIS_URL

MODELS = (
    ModelConfig(id="fake-chat", tokenizer="whitespace", max_output_tokens=16),
    ModelConfig(id="fake-embed", task="embed", tokenizer="whitespace"),
)
PRICES = {"fake-chat": ModelPrice(prompt_eur_per_million=1000, completion_eur_per_million=2000)}


def chat(
    gateway: RunningGateway,
    key: str,
    words: int = 2,
    max_tokens: int = 4,
    stream: bool = False,
    content: str | None = None,
) -> httpx.Response:
    body: dict[str, Any] = {
        "model": "fake-chat",
        "max_tokens": max_tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": content or " ".join(["w"] * words)}],
    }
    return httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )


def set_quotas(gateway: RunningGateway, tenant: str, quotas: dict[str, Any]) -> None:
    response = gateway.admin("PATCH", f"/tenants/{tenant}", json={"quotas": quotas})
    assert response.status_code == 200, response.text


def quota(gateway: RunningGateway, tenant: str) -> dict[str, dict[str, Any]]:
    gateway.server.call(gateway.state.quotas.drain())  # reconciliation follows the answer
    response = gateway.admin("GET", f"/tenants/{tenant}/quota")
    assert response.status_code == 200, response.text
    return {f"{row['scope']}:{row['limit']}": row for row in response.json()["limits"]}


@pytest.fixture(params=["memory", "redis"])
def quota_gateway(
    request: pytest.FixtureRequest, gateway_factory: GatewayFactory
) -> RunningGateway:
    redis_url = REDIS_URL if request.param == "redis" else None
    return gateway_factory(redis_url=redis_url, file=FileConfig(models=MODELS, prices=PRICES))


def test_requests_per_minute(quota_gateway: RunningGateway) -> None:
    gateway = quota_gateway
    key = gateway.create_tenant("acme")
    set_quotas(gateway, "acme", {"requests_per_minute": 3})
    for remaining in (2, 1, 0):
        response = chat(gateway, key)
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit-requests"] == "3"
        assert response.headers["x-ratelimit-remaining-requests"] == str(remaining)
        assert response.headers["x-ratelimit-reset-requests"].endswith("s")
    refused = chat(gateway, key)
    error = assert_openai_error(refused, 429, "rate_limit_requests")
    assert error["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["retry-after"]) <= 61
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    streamed = chat(gateway, key, stream=True)
    assert_openai_error(streamed, 429, "rate_limit_requests")
    assert len(gateway.records()) == 3
    rejections = gateway.state.metrics.registry.get_sample_value(
        "sluis_quota_rejections_total", {"tenant": "acme", "limit": "rate_limit_requests"}
    )
    assert rejections == 2


def test_token_budget_is_exact_and_leaves_no_reservation(quota_gateway: RunningGateway) -> None:
    gateway = quota_gateway
    key = gateway.create_tenant("acme")
    set_quotas(gateway, "acme", {"tokens_per_day": 100, "tokens_per_minute": 1000})
    statuses = []
    for i in range(12):
        # 3 prompt words + up to 5 tokens: 8 reserved, 8 used (streams and not).
        statuses.append(chat(gateway, key, words=3, max_tokens=5, stream=i % 2 == 1).status_code)
    assert statuses == [200] * 12
    over = chat(gateway, key, words=3, max_tokens=5)
    assert_openai_error(over, 429, "budget_tokens")
    records = gateway.records()
    spent = sum(r["prompt_tokens"] + r["completion_tokens"] for r in records)
    assert spent == 96
    state = quota(gateway, "acme")
    assert state["all:budget_tokens"]["used"] == spent
    assert state["all:budget_tokens"]["reserved"] == 0
    assert state["all:rate_limit_tokens"]["used"] == spent
    # A smaller request still fits what is left (4 tokens).
    assert chat(gateway, key, words=1, max_tokens=3).status_code == 200


def test_a_request_that_can_never_fit_is_refused_up_front(quota_gateway: RunningGateway) -> None:
    gateway = quota_gateway
    key = gateway.create_tenant("acme")
    set_quotas(gateway, "acme", {"tokens_per_minute": 10})
    refused = chat(gateway, key, words=3, max_tokens=50)
    error = assert_openai_error(refused, 429, "rate_limit_tokens")
    assert "can never be admitted" in str(error["message"])
    assert gateway.records() == []


def test_money_budget(quota_gateway: RunningGateway) -> None:
    gateway = quota_gateway
    key = gateway.create_tenant("acme")
    # 2 prompt tokens at 0.001 EUR and 4 completion tokens at 0.002 EUR: 0.01 EUR a request.
    set_quotas(gateway, "acme", {"eur_per_month": 0.03})
    assert [chat(gateway, key).status_code for _ in range(3)] == [200, 200, 200]
    assert_openai_error(chat(gateway, key), 429, "budget_money")
    state = quota(gateway, "acme")
    assert state["all:budget_money"]["used"] == 30_000  # micro-euros
    assert state["all:budget_money"]["reserved"] == 0


def test_concurrency(quota_gateway: RunningGateway) -> None:
    gateway = quota_gateway
    key = gateway.create_tenant("acme")
    set_quotas(gateway, "acme", {"max_concurrent": 1})
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={
            "model": "fake-chat",
            "max_tokens": 10,
            "stream": True,
            "messages": [{"role": "user", "content": "slow [[delay:0.05]]"}],
        },
    ) as slow:
        assert slow.status_code == 200
        assert_openai_error(chat(gateway, key), 429, "concurrency")
        slow.read()
    assert chat(gateway, key).status_code == 200


def test_client_leaving_mid_stream_settles_what_it_received(quota_gateway: RunningGateway) -> None:
    gateway = quota_gateway
    key = gateway.create_tenant("acme")
    set_quotas(gateway, "acme", {"tokens_per_day": 10_000, "max_concurrent": 5})
    leave_mid_stream(gateway.url, key, max_tokens=16, delay_s=0.1)
    deadline = time.monotonic() + 10
    while quota(gateway, "acme")["all:budget_tokens"]["reserved"] and time.monotonic() < deadline:
        time.sleep(0.05)
    state = quota(gateway, "acme")
    [record] = gateway.records()
    assert record["outcome"] == "cancelled"
    assert state["all:budget_tokens"]["reserved"] == 0
    assert (
        state["all:budget_tokens"]["used"] == record["prompt_tokens"] + record["completion_tokens"]
    )
    assert state["all:concurrency"]["used"] == 0


def test_defaults_per_model_limits_and_unlimited_override(gateway_factory: GatewayFactory) -> None:
    defaults = QuotaPolicy(requests_per_minute=2, models={"fake-embed": {"requests_per_minute": 1}})  # type: ignore[dict-item]
    gateway = gateway_factory(file=FileConfig(models=MODELS, quotas=defaults))
    key = gateway.create_tenant("acme")
    embed = {"model": "fake-embed", "input": "a"}
    headers = {"authorization": f"Bearer {key}"}
    assert (
        httpx.post(f"{gateway.url}/v1/embeddings", json=embed, headers=headers).status_code == 200
    )
    second = httpx.post(f"{gateway.url}/v1/embeddings", json=embed, headers=headers)
    assert_openai_error(second, 429, "rate_limit_requests")
    assert chat(gateway, key).status_code == 200
    assert_openai_error(chat(gateway, key), 429, "rate_limit_requests")
    set_quotas(gateway, "acme", {"requests_per_minute": "unlimited"})  # whatever the default
    assert [chat(gateway, key).status_code for _ in range(3)] == [200, 200, 200]
    shown = gateway.admin("GET", "/tenants/acme/quota").json()
    assert "requests_per_minute" not in shown["policy"]
    assert shown["policy"]["models"]["fake-embed"]["requests_per_minute"] == 1


@pytest.mark.parametrize(
    ("quotas", "param"),
    [
        ({"requests_per_minute": -1}, "quotas.requests_per_minute"),
        ({"requests_per_minute": "ten"}, "quotas.requests_per_minute"),
        ({"models": {"gpt-9": {"max_concurrent": 1}}}, "models"),
        ({"surprise": 1}, "quotas.surprise"),
    ],
)
def test_bad_quota_settings(gateway: RunningGateway, quotas: dict[str, Any], param: str) -> None:
    gateway.create_tenant("acme")
    response = gateway.admin("PATCH", "/tenants/acme", json={"quotas": quotas})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert gateway.admin("GET", "/tenants/acme").json()["quotas"] == {}


def _dead_redis() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there


@pytest.mark.parametrize("mode", ["closed", "open", None])
def test_store_down(gateway_factory: GatewayFactory, mode: str | None) -> None:
    gateway = gateway_factory(
        redis_url=_dead_redis(), quota_fail_mode=mode, file=FileConfig(models=MODELS, prices=PRICES)
    )
    key = gateway.create_tenant("acme")
    set_quotas(gateway, "acme", {"requests_per_minute": 100, "tokens_per_day": 10_000})
    started = time.monotonic()
    response = chat(gateway, key)
    assert time.monotonic() - started < 5
    if mode == "open":
        assert response.status_code == 200
        assert "x-ratelimit-limit-requests" not in response.headers
    else:  # closed, and the default for a tenant with a budget
        error = assert_openai_error(response, 503, "store_unavailable")
        assert error["type"] == "service_unavailable_error"
        assert int(response.headers["retry-after"]) >= 1
    failures = gateway.state.metrics.registry.get_sample_value(
        "sluis_quota_store_failures_total", {"mode": mode or "closed", "operation": "admit"}
    )
    assert failures == 1
    assert_openai_error(gateway.admin("GET", "/tenants/acme/quota"), 503, "store_unavailable")


def test_readiness_reports_the_quota_store(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(redis_url=_dead_redis(), file=FileConfig(models=MODELS))
    ready = httpx.get(f"{gateway.url}/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["quota_store"].startswith("unavailable")
    assert ready.json()["checks"]["database"] == "ok"
