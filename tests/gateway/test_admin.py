"""The admin API end to end: tenants, keys (rotation with grace), usage, audit."""

from __future__ import annotations

from datetime import datetime, timedelta

import httpx
import pytest

from gateway.clock import ManualClock
from tests.conftest import GatewayFactory, RunningGateway
from tests.gateway.errors import assert_openai_error

CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "a b c"}], "max_tokens": 4}


def chat(gateway: RunningGateway, key: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"}
    )


def test_create_list_get_update_tenant(gateway: RunningGateway) -> None:
    created = gateway.admin(
        "POST",
        "/tenants",
        json={"name": "gemeente-utrecht", "models": ["fake-chat"], "metadata": {"residency": "nl"}},
    )
    assert created.status_code == 201
    tenant = created.json()
    assert tenant["id"].startswith("ten_")
    assert tenant["status"] == "active"
    assert gateway.admin("GET", f"/tenants/{tenant['id']}").json() == tenant
    assert [t["name"] for t in gateway.admin("GET", "/tenants").json()["data"]] == [
        "gemeente-utrecht"
    ]
    patched = gateway.admin(
        "PATCH", "/tenants/gemeente-utrecht", json={"models": ["fake-chat", "fake-embed"]}
    ).json()
    assert patched["models"] == ["fake-chat", "fake-embed"]
    assert patched["metadata"] == {"residency": "nl"}


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"name": "acme", "models": ["gpt-9"]}, 400, "model_not_found"),
        ({"name": "Bad Name"}, 400, "invalid_request"),
        ({"name": "acme", "models": "fake-chat"}, 400, "invalid_value"),
        ({"name": "acme", "surprise": 1}, 400, "invalid_value"),
    ],
)
def test_tenant_validation(
    gateway: RunningGateway, body: dict[str, object], status: int, code: str
) -> None:
    assert_openai_error(gateway.admin("POST", "/tenants", json=body), status, code)
    assert gateway.admin("GET", "/tenants").json()["data"] == []


def test_duplicate_and_missing_tenants(gateway: RunningGateway) -> None:
    gateway.create_tenant("acme")
    assert_openai_error(gateway.admin("POST", "/tenants", json={"name": "acme"}), 409, "conflict")
    assert_openai_error(gateway.admin("GET", "/tenants/nobody"), 404, "tenant_not_found")
    assert_openai_error(
        gateway.admin("POST", "/tenants/nobody/keys", json={}), 404, "tenant_not_found"
    )
    assert_openai_error(gateway.admin("DELETE", "/keys/nokey"), 404, "key_not_found")


@pytest.mark.parametrize("expires_in_s", [10**12, 10 * 366 * 24 * 3600, 0, "60"])
def test_key_expiry_out_of_range(gateway: RunningGateway, expires_in_s: object) -> None:
    gateway.admin("POST", "/tenants", json={"name": "acme"})
    response = gateway.admin("POST", "/tenants/acme/keys", json={"expires_in_s": expires_in_s})
    error = assert_openai_error(response, 400, "invalid_value")
    assert error["param"] == "expires_in_s"
    assert gateway.admin("GET", "/tenants/acme/keys").json()["data"] == []
    actions = [e["action"] for e in gateway.admin("GET", "/audit").json()["data"]]
    assert actions == ["tenant.create"]


def test_key_expiry_at_the_bound(gateway: RunningGateway) -> None:
    gateway.admin("POST", "/tenants", json={"name": "acme"})
    response = gateway.admin(
        "POST", "/tenants/acme/keys", json={"expires_in_s": 10 * 365 * 24 * 3600}
    )
    assert response.status_code == 201, response.text
    key = response.json()
    lifetime = datetime.fromisoformat(key["expires_at"]) - datetime.fromisoformat(key["created_at"])
    assert abs(lifetime - timedelta(days=3650)) < timedelta(seconds=5)


def test_key_is_shown_once_and_listed_by_prefix(gateway: RunningGateway) -> None:
    key = gateway.create_tenant("acme")
    [listed] = gateway.admin("GET", "/tenants/acme/keys").json()["data"]
    assert "key" not in listed
    assert key.startswith(listed["prefix"] + "-")
    assert key[len(listed["prefix"]) + 1 :] not in str(listed)


def test_rotation_keeps_both_keys_working_for_the_grace_period(
    gateway_factory: GatewayFactory,
) -> None:
    clock = ManualClock()
    gateway = gateway_factory(clock=clock)
    old = gateway.create_tenant("acme")
    [listed] = gateway.admin("GET", "/tenants/acme/keys").json()["data"]
    rotated = gateway.admin("POST", f"/keys/{listed['id']}/rotate", json={"grace_s": 3600})
    assert rotated.status_code == 201
    new = rotated.json()["key"]
    assert rotated.json()["previous"]["rotated_to"] == rotated.json()["id"]
    assert chat(gateway, old).status_code == 200
    assert chat(gateway, new).status_code == 200
    clock.advance(3601)
    assert_openai_error(chat(gateway, old), 401, "api_key_expired")
    assert chat(gateway, new).status_code == 200
    records = gateway.records()
    assert sorted(r["key_id"] for r in records) == sorted(
        [listed["id"], rotated.json()["id"], rotated.json()["id"]]
    )


def test_usage_totals_match_what_clients_saw(gateway: RunningGateway) -> None:
    acme = gateway.create_tenant("acme")
    city = gateway.create_tenant("city")
    seen = {"acme": 0, "city": 0}
    for name, key, n in (("acme", acme, 3), ("city", city, 2)):
        for _ in range(n):
            seen[name] += chat(gateway, key).json()["usage"]["total_tokens"]
    gateway.flush()
    totals = gateway.admin("GET", "/usage").json()["data"]
    assert {t["tenant"]: t["total_tokens"] for t in totals} == seen
    assert {t["tenant"]: t["requests"] for t in totals} == {"acme": 3, "city": 2}
    only = gateway.admin("GET", "/usage", params={"tenant": "city", "model": "fake-chat"})
    assert [t["requests"] for t in only.json()["data"]] == [2]
    future = gateway.admin("GET", "/usage", params={"from": "2999-01-01"})
    assert future.json()["data"] == []
    assert_openai_error(
        gateway.admin("GET", "/usage", params={"from": "yesterday"}), 400, "invalid_request"
    )


def test_audit_log_names_the_actor(gateway: RunningGateway) -> None:
    response = httpx.post(
        f"{gateway.url}/admin/v1/tenants",
        json={"name": "acme"},
        headers={
            "authorization": "Bearer test-admin-token-0123456789",
            "x-sluis-actor": "alice@factory.eu",
        },
    )
    assert response.status_code == 201
    gateway.admin("PATCH", "/tenants/acme", json={"status": "suspended"})
    entries = gateway.admin("GET", "/audit", params={"tenant": "acme"}).json()["data"]
    assert [(e["actor"], e["action"]) for e in entries] == [
        ("admin", "tenant.suspend"),
        ("alice@factory.eu", "tenant.create"),
    ]


def test_health_and_readiness(gateway: RunningGateway) -> None:
    assert httpx.get(f"{gateway.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{gateway.url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {
        "database": "ok",
        "quota_store": "ok",
        "upstream": "ok",
        "models": "ok",
    }
    detail = gateway.admin("GET", "/readyz")  # the admin's view names each model
    assert detail.status_code == 200
    assert detail.json()["checks"] == {
        "database": "ok",
        "quota_store": "ok",
        "model:fake-chat": "ok",
        "model:fake-embed": "ok",
    }
