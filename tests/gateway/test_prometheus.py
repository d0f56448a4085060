"""A real Prometheus scraping the gateway: the token counters it stores equal the ledger,
across a gateway restart, with no counter reset (so billing from Prometheus loses nothing)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from loadtests.processes import free_port
from tests.conftest import GatewayFactory, RunningGateway
from tests.prometheus import PrometheusServer

CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "a b c d"}], "max_tokens": 7}


@pytest.fixture
def metrics_port() -> int:
    return free_port()


@pytest.fixture
def prometheus(tmp_path: Path, metrics_port: int) -> Iterator[PrometheusServer]:
    server = PrometheusServer(tmp_path / "prom", [f"127.0.0.1:{metrics_port}"])
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _eventually(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "Prometheus did not catch up"
        time.sleep(0.5)


def _stored(prometheus: PrometheusServer, expression: str) -> float:
    result = prometheus.query(expression)
    return float(result[0]["value"][1]) if result else -1.0


def _chat(gateway: RunningGateway, headers: dict[str, str], times: int) -> None:
    for _ in range(times):
        response = httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, headers=headers)
        assert response.status_code == 200


def _ledger_tokens(gateway: RunningGateway) -> int:
    return sum(r["prompt_tokens"] + r["completion_tokens"] for r in gateway.records())


def test_counters_in_prometheus_equal_the_ledger_across_a_restart(
    tmp_path: Path,
    gateway_factory: GatewayFactory,
    metrics_port: int,
    prometheus: PrometheusServer,
) -> None:
    first = gateway_factory(metrics_port=metrics_port, gateway_id="gw-1")
    key = first.create_tenant("acme")
    headers = {"authorization": f"Bearer {key}"}
    _chat(first, headers, 5)
    tokens = _ledger_tokens(first)
    assert tokens == 5 * 11
    _eventually(lambda: _stored(prometheus, 'sum(sluis_tokens_total{tenant="acme"})') == tokens)
    first.stop()

    second = gateway_factory(metrics_port=metrics_port, gateway_id="gw-1")
    _chat(second, headers, 3)
    tokens = _ledger_tokens(second)
    assert tokens == 8 * 11
    _eventually(lambda: _stored(prometheus, 'sum(sluis_tokens_total{tenant="acme"})') == tokens)
    assert _stored(prometheus, 'sum(sluis_requests_total{tenant="acme"})') == 8
    # The restart is no counter reset: increase() over the whole period needs no guessing.
    assert _stored(prometheus, "sum(resets(sluis_tokens_total[10m]))") == 0
