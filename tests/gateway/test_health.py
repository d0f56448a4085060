"""`/healthz` and `/readyz`: the public view says ready or not, per check; the admin's says why."""

from __future__ import annotations

import httpx

from gateway.settings import FileConfig, ModelConfig
from loadtests.processes import free_port
from tests.conftest import GatewayFactory, RunningGateway
from tests.gateway.errors import assert_openai_error

# Nothing of these may reach an unauthenticated caller.
SECRETS = ("s3cret-pass", "sluis-user", "redis-pass", "127.0.0.1", "private-chat", "llama-private")


def broken_gateway(gateway_factory: GatewayFactory) -> tuple[RunningGateway, int]:
    """A gateway whose upstream (with credentials in its URL) and Redis are both down."""
    upstream_port = free_port()
    gateway = gateway_factory(
        upstream_url=f"http://sluis-user:s3cret-pass@127.0.0.1:{upstream_port}",
        redis_url=f"redis://:redis-pass@127.0.0.1:{free_port()}/0",
        file=FileConfig(
            models=(ModelConfig(id="private-chat", upstream_model="/srv/llama-private"),)
        ),
    )
    return gateway, upstream_port


def test_healthz(gateway: RunningGateway) -> None:
    response = httpx.get(f"{gateway.url}/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_ready_public_view(gateway: RunningGateway) -> None:
    ready = httpx.get(f"{gateway.url}/readyz")
    assert ready.status_code == 200
    assert "retry-after" not in ready.headers
    assert ready.json() == {
        "status": "ready",
        "checks": {"database": "ok", "quota_store": "ok", "upstream": "ok", "models": "ok"},
    }


def test_not_ready_public_view_tells_nothing_about_why(gateway_factory: GatewayFactory) -> None:
    gateway, upstream_port = broken_gateway(gateway_factory)
    ready = httpx.get(f"{gateway.url}/readyz")
    assert ready.status_code == 503
    assert ready.headers["retry-after"] == "5"
    assert ready.json() == {
        "status": "not_ready",
        "checks": {
            "database": "ok",
            "quota_store": "unavailable",
            "upstream": "unavailable",
            "models": "unknown",
        },
    }
    for secret in (*SECRETS, str(upstream_port), "/srv"):
        assert secret not in ready.text


def test_a_missing_model_is_not_named_publicly(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(
        file=FileConfig(
            models=(ModelConfig(id="fake-chat"), ModelConfig(id="private-chat", upstream_model="x"))
        )
    )
    ready = httpx.get(f"{gateway.url}/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"] == {
        "database": "ok",
        "quota_store": "ok",
        "upstream": "ok",
        "models": "missing",
    }
    assert "private-chat" not in ready.text and "fake-chat" not in ready.text
    detail = gateway.admin("GET", "/readyz")
    assert detail.status_code == 503
    assert detail.json()["checks"]["model:private-chat"] == "missing"
    assert detail.json()["checks"]["model:fake-chat"] == "ok"


def test_admin_view_says_why_without_credentials(gateway_factory: GatewayFactory) -> None:
    gateway, upstream_port = broken_gateway(gateway_factory)
    detail = gateway.admin("GET", "/readyz")
    assert detail.status_code == 503
    assert detail.headers["retry-after"] == "5"
    body = detail.json()
    assert body["status"] == "not_ready"
    checks = body["checks"]
    assert checks["database"] == "ok"
    assert checks["quota_store"].startswith("unavailable: ")
    assert checks["upstream"].startswith("unavailable: ")
    assert body["upstream"] == {"kind": "http", "url": f"http://127.0.0.1:{upstream_port}"}
    assert "s3cret-pass" not in detail.text and "redis-pass" not in detail.text


def test_admin_view_needs_the_admin_token(gateway: RunningGateway) -> None:
    key = gateway.create_tenant("acme")
    response = httpx.get(
        f"{gateway.url}/admin/v1/readyz", headers={"authorization": f"Bearer {key}"}
    )
    assert_openai_error(response, 403, "admin_only")
    assert_openai_error(httpx.get(f"{gateway.url}/admin/v1/readyz"), 401, "missing_admin_token")
