"""Quota policy semantics as an operator expects them: per-model budgets count for the fail mode,
per-model overrides overlay the defaults field by field, PATCH merges (RFC 7396)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from gateway.clock import ManualClock
from gateway.settings import FileConfig, ModelConfig
from loadtests.processes import free_port
from quotas.policy import QuotaPolicy, effective_policy
from tests.conftest import ADMIN_TOKEN, GatewayFactory, RunningGateway
from tests.gateway.errors import assert_openai_error

MODELS = (
    ModelConfig(id="fake-chat", tokenizer="whitespace", max_output_tokens=16),
    ModelConfig(id="fake-embed", task="embed", tokenizer="whitespace"),
)


def chat(gateway: RunningGateway, key: str) -> httpx.Response:
    body = {"model": "fake-chat", "max_tokens": 4, "messages": [{"role": "user", "content": "w"}]}
    return httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )


def patch_if(gateway: RunningGateway, if_match: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.patch(
        f"{gateway.url}/admin/v1/tenants/acme",
        json=body,
        headers={"authorization": f"Bearer {ADMIN_TOKEN}", "if-match": if_match},
        timeout=30,
    )


def patch_quotas(gateway: RunningGateway, quotas: dict[str, Any] | None) -> dict[str, Any]:
    response = gateway.admin("PATCH", "/tenants/acme", json={"quotas": quotas})
    assert response.status_code == 200, response.text
    stored: dict[str, Any] = response.json()["quotas"]
    assert gateway.admin("GET", "/tenants/acme").json()["quotas"] == stored
    return stored


# -- M3: per-model budgets and the default fail mode -----------------------------------------


def test_a_per_model_budget_is_a_budget() -> None:
    only_per_model = effective_policy(QuotaPolicy(), {"models": {"big": {"eur_per_month": 100}}})
    assert only_per_model.has_any_budget()
    assert not only_per_model.has_budget()  # the tenant-wide fields alone
    rates_only = effective_policy(
        QuotaPolicy(), {"requests_per_minute": 60, "models": {"big": {"max_concurrent": 2}}}
    )
    assert not rates_only.has_any_budget()
    assert effective_policy(QuotaPolicy(), {"tokens_per_day": 10}).has_any_budget()


def test_per_model_budget_fails_closed_by_default(gateway_factory: GatewayFactory) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    gateway = gateway_factory(redis_url=dead_redis, file=FileConfig(models=MODELS))
    key = gateway.create_tenant("acme")
    patch_quotas(gateway, {"models": {"fake-chat": {"eur_per_month": 100}}})
    response = chat(gateway, key)
    error = assert_openai_error(response, 503, "store_unavailable")
    assert error["type"] == "service_unavailable_error"
    assert int(response.headers["retry-after"]) >= 1
    closed = gateway.state.metrics.registry.get_sample_value(
        "sluis_quota_store_failures_total", {"mode": "closed", "operation": "admit"}
    )
    assert closed == 1


# -- M6: per-model overrides overlay the defaults ----------------------------------------------


def test_model_override_overlays_the_default_field_by_field() -> None:
    defaults = QuotaPolicy.model_validate(
        {"requests_per_minute": 600, "models": {"fake-chat": {"max_concurrent": 16}}}
    )
    policy = effective_policy(defaults, {"models": {"fake-chat": {"tokens_per_day": 1000}}})
    chat_limits = policy.for_model("fake-chat")
    assert chat_limits is not None
    assert (chat_limits.max_concurrent, chat_limits.tokens_per_day) == (16, 1000)
    assert policy.requests_per_minute == 600
    lowered = effective_policy(defaults, {"models": {"fake-chat": {"max_concurrent": 4}}})
    assert lowered.models["fake-chat"].max_concurrent == 4
    other = effective_policy(defaults, {"models": {"fake-embed": {"requests_per_minute": 5}}})
    assert other.models["fake-chat"].max_concurrent == 16
    assert other.models["fake-embed"].requests_per_minute == 5


def test_unlimited_whatever_the_default() -> None:
    defaults = QuotaPolicy.model_validate(
        {"requests_per_minute": 600, "models": {"fake-chat": {"max_concurrent": 16}}}
    )
    policy = effective_policy(
        defaults,
        {"requests_per_minute": None, "models": {"fake-chat": {"max_concurrent": None}}},
    )
    assert policy.requests_per_minute is None
    assert policy.models["fake-chat"].max_concurrent is None


def test_quota_report_shows_the_overlaid_model_limits(gateway_factory: GatewayFactory) -> None:
    defaults = QuotaPolicy.model_validate({"models": {"fake-chat": {"max_concurrent": 16}}})
    gateway = gateway_factory(file=FileConfig(models=MODELS, quotas=defaults))
    gateway.create_tenant("acme")
    patch_quotas(gateway, {"models": {"fake-chat": {"tokens_per_day": 1000}}})
    report = gateway.admin("GET", "/tenants/acme/quota").json()
    assert report["policy"]["models"]["fake-chat"] == {"max_concurrent": 16, "tokens_per_day": 1000}
    limits = {(row["scope"], row["limit"]): row["max"] for row in report["limits"]}
    assert limits[("fake-chat", "concurrency")] == 16
    assert limits[("fake-chat", "budget_tokens")] == 1000


# -- PATCH merges -------------------------------------------------------------------------------


def test_patch_merges_quotas(gateway: RunningGateway) -> None:
    gateway.create_tenant("acme")
    assert patch_quotas(gateway, {"tokens_per_day": 5}) == {"tokens_per_day": 5}
    assert patch_quotas(gateway, {"requests_per_minute": 3}) == {
        "tokens_per_day": 5,
        "requests_per_minute": 3,
    }
    assert patch_quotas(gateway, {"tokens_per_day": None}) == {"requests_per_minute": 3}
    patch_quotas(gateway, {"models": {"fake-chat": {"max_concurrent": 2}}})
    assert patch_quotas(gateway, {"models": {"fake-chat": {"tokens_per_day": 9}}}) == {
        "requests_per_minute": 3,
        "models": {"fake-chat": {"max_concurrent": 2, "tokens_per_day": 9}},
    }
    patch_quotas(gateway, {"models": {"fake-embed": {"requests_per_minute": 1}}})
    assert patch_quotas(gateway, {"models": {"fake-chat": {"max_concurrent": None}}}) == {
        "requests_per_minute": 3,
        "models": {"fake-chat": {"tokens_per_day": 9}, "fake-embed": {"requests_per_minute": 1}},
    }
    assert patch_quotas(gateway, {"models": {"fake-chat": None}}) == {
        "requests_per_minute": 3,
        "models": {"fake-embed": {"requests_per_minute": 1}},
    }
    # Emptying a model's settings leaves no empty object behind.
    assert patch_quotas(gateway, {"models": {"fake-embed": {"requests_per_minute": None}}}) == {
        "requests_per_minute": 3
    }
    patch_quotas(gateway, {"eur_per_month": 2.5, "models": {"fake-chat": {"max_concurrent": 1}}})
    assert patch_quotas(gateway, None) == {}  # "quotas": null: back to the defaults entirely


def test_unlimited_and_back_to_the_default_through_the_gateway(
    gateway_factory: GatewayFactory,
) -> None:
    defaults = QuotaPolicy(requests_per_minute=2)
    gateway = gateway_factory(file=FileConfig(models=MODELS, quotas=defaults))
    key = gateway.create_tenant("acme")
    assert patch_quotas(gateway, {"requests_per_minute": "unlimited"}) == {
        "requests_per_minute": "unlimited"
    }
    assert [chat(gateway, key).status_code for _ in range(3)] == [200, 200, 200]
    report = gateway.admin("GET", "/tenants/acme/quota").json()
    assert "requests_per_minute" not in report["policy"]
    assert patch_quotas(gateway, {"requests_per_minute": None}) == {}
    assert gateway.admin("GET", "/tenants/acme/quota").json()["policy"] == {
        "requests_per_minute": 2,
        "models": {},
    }


@pytest.mark.parametrize(
    ("quotas", "code", "param"),
    [
        ({"requests_per_minute": -1}, "invalid_value", "quotas.requests_per_minute"),
        ({"requests_per_minute": "Unlimited!"}, "invalid_value", "quotas.requests_per_minute"),
        ({"requests_per_minute": 1.5}, "invalid_value", "quotas.requests_per_minute"),
        ({"max_concurrent": True}, "invalid_value", "quotas.max_concurrent"),
        ({"eur_per_month": -0.01}, "invalid_value", "quotas.eur_per_month"),
        (
            {"models": {"fake-chat": {"tokens_per_day": "lots"}}},
            "invalid_value",
            "quotas.models.fake-chat.tokens_per_day",
        ),
        ({"models": {"gpt-9": {"max_concurrent": 1}}}, "model_not_found", "models"),
    ],
)
def test_bad_patches_change_nothing(
    gateway: RunningGateway, quotas: dict[str, Any], code: str, param: str
) -> None:
    gateway.create_tenant("acme")
    patch_quotas(gateway, {"tokens_per_day": 7})
    before = gateway.admin("GET", "/tenants/acme").json()
    response = gateway.admin("PATCH", "/tenants/acme", json={"quotas": quotas})
    assert assert_openai_error(response, 400, code)["param"] == param
    assert gateway.admin("GET", "/tenants/acme").json() == before


def test_settings_of_a_retired_model_can_be_removed(gateway: RunningGateway) -> None:
    gateway.create_tenant("acme")
    patch_quotas(gateway, {"tokens_per_day": 7})
    assert patch_quotas(gateway, {"models": {"retired-model": None}}) == {"tokens_per_day": 7}


# -- lost updates -------------------------------------------------------------------------------


def test_etag_and_if_match(gateway: RunningGateway) -> None:
    gateway.create_tenant("acme")
    got = gateway.admin("GET", "/tenants/acme")
    version = got.json()["version"]
    assert got.headers["etag"] == f'"{version}"'
    patched = patch_if(gateway, got.headers["etag"], {"quotas": {"tokens_per_day": 5}})
    assert patched.status_code == 200, patched.text
    assert patched.json()["version"] == version + 1
    assert patched.headers["etag"] == f'"{version + 1}"'
    assert gateway.admin("GET", "/tenants/acme").headers["etag"] == patched.headers["etag"]

    for stale in (got.headers["etag"], f'W/"{version + 1}"', '"nonsense"'):
        refused = patch_if(gateway, stale, {"quotas": {"tokens_per_day": 6}, "status": "suspended"})
        error = assert_openai_error(refused, 412, "precondition_failed")
        assert error["param"] is None
        assert refused.headers["etag"] == patched.headers["etag"]
    assert gateway.admin("GET", "/tenants/acme").json() == patched.json()

    for matching in (f'"{version + 1}", "99"', "*"):
        response = patch_if(gateway, matching, {"quotas": {"requests_per_minute": 1}})
        assert response.status_code == 200, response.text
    unconditional = gateway.admin("PATCH", "/tenants/acme", json={"metadata": {"tier": "sme"}})
    assert unconditional.status_code == 200
    assert unconditional.json()["version"] == version + 4
    assert unconditional.json()["quotas"] == {"tokens_per_day": 5, "requests_per_minute": 1}
    missing = httpx.patch(
        f"{gateway.url}/admin/v1/tenants/nobody",
        json={},
        headers={"authorization": f"Bearer {ADMIN_TOKEN}", "if-match": '"1"'},
    )
    assert_openai_error(missing, 404, "tenant_not_found")


def test_concurrent_patches_of_different_fields_all_survive(gateway: RunningGateway) -> None:
    gateway.create_tenant("acme")
    start = gateway.admin("GET", "/tenants/acme").json()["version"]
    patches: list[dict[str, Any]] = [
        {"requests_per_minute": 1},
        {"tokens_per_minute": 2},
        {"max_concurrent": 3},
        {"tokens_per_day": 4},
        {"tokens_per_month": 5},
        {"eur_per_month": 6.5},
        {"models": {"fake-chat": {"max_concurrent": 7}}},
        {"models": {"fake-chat": {"tokens_per_day": 8}}},
        {"models": {"fake-embed": {"requests_per_minute": 9}}},
    ]

    def send(patch: dict[str, Any]) -> int:
        return gateway.admin("PATCH", "/tenants/acme", json={"quotas": patch}).status_code

    with ThreadPoolExecutor(len(patches)) as pool:
        assert list(pool.map(send, patches)) == [200] * len(patches)
    tenant = gateway.admin("GET", "/tenants/acme").json()
    assert tenant["quotas"] == {
        "requests_per_minute": 1,
        "tokens_per_minute": 2,
        "max_concurrent": 3,
        "tokens_per_day": 4,
        "tokens_per_month": 5,
        "eur_per_month": 6.5,
        "models": {
            "fake-chat": {"max_concurrent": 7, "tokens_per_day": 8},
            "fake-embed": {"requests_per_minute": 9},
        },
    }
    assert tenant["version"] == start + len(patches)


def test_updates_within_one_clock_tick_take_effect(gateway_factory: GatewayFactory) -> None:
    clock = ManualClock()  # never advanced: every update happens at the same instant
    gateway = gateway_factory(clock=clock, file=FileConfig(models=MODELS))
    key = gateway.create_tenant("acme")
    patch_quotas(gateway, {"requests_per_minute": 1})
    assert chat(gateway, key).status_code == 200
    assert_openai_error(chat(gateway, key), 429, "rate_limit_requests")
    patch_quotas(gateway, {"requests_per_minute": 3})
    assert chat(gateway, key).status_code == 200
