"""Every query Sluis ships, run against a real Prometheus that scrapes the running stack.

Prometheus runs the committed `dashboards/prometheus/prometheus.yml` and its rule files, with
the targets pointed at this session's ports and 1 s scrapes. Load from several tenants (one
with a budget, one over its rate limit, one bad request) flows while it scrapes; a second
gateway whose quota store is down in `open` mode drives the fail-open panels. Then every panel
query, template variable, recording rule and alert signal must parse and return data, and
every metric they name must exist.
"""

from __future__ import annotations

import math
import re
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from dashboards import expressions
from loadtests.processes import free_port
from tests.clients import admin_request
from tests.deployments.conftest import RealStack
from tests.processes import GatewayProcess
from tests.prometheus import PrometheusServer
from tests.servers import ServerThread

pytestmark = pytest.mark.real_stack

ADMIN_TOKEN = "dashboards-admin-token"
FAIL_OPEN_CONFIG = """
models:
  - id: fake-chat
    tokenizer: whitespace
    max_output_tokens: 16
quotas:
  requests_per_minute: 100000
"""
# A metric or recording-rule name inside an expression.
_NAME = re.compile(r'(?<![\w"$.-])([a-z_]+:[a-z0-9_:]+|(?:sluis|ray)_[a-z0-9_]+|up)(?=[\s{\[)])')


@pytest.fixture(scope="module")
def fail_open_gateway(
    tmp_path_factory: pytest.TempPathFactory, fake_engine_server: ServerThread
) -> Iterator[tuple[GatewayProcess, int]]:
    """A gateway whose Redis is gone, failing open: what the store-failure panels show."""
    workdir = tmp_path_factory.mktemp("fail-open")
    (workdir / "sluis.yaml").write_text(FAIL_OPEN_CONFIG)
    metrics_port = free_port()
    env = {
        "SLUIS_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "SLUIS_QUOTA_FAIL_MODE": "open",
        "SLUIS_QUOTA_TIMEOUT_S": "0.2",
        "SLUIS_ADMIN_TOKEN": ADMIN_TOKEN,
        "SLUIS_STATE_DIR": str(workdir / "state"),
        "SLUIS_METRICS_PORT": str(metrics_port),
    }
    gateway = GatewayProcess(workdir, env, fake_engine_server.url)
    try:
        gateway.wait_ready()
        yield gateway, metrics_port
    finally:
        assert gateway.stop() == 0


def _prometheus_config(gateway_targets: list[str], ray_target: str) -> dict[str, Any]:
    """The committed scrape config and rules, aimed at this session's ports."""
    config: dict[str, Any] = yaml.safe_load(
        (expressions.PROMETHEUS_DIR / "prometheus.yml").read_text()
    )
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(expressions.PROMETHEUS_DIR / f) for f in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"sluis-gateway", "ray"}
    jobs["sluis-gateway"]["static_configs"] = [{"targets": gateway_targets}]
    del jobs["ray"]["file_sd_configs"]
    jobs["ray"]["static_configs"] = [{"targets": [ray_target]}]
    return config


class Load:
    """Requests from several tenants in background threads until stopped."""

    def __init__(self, stack: RealStack, fail_open: GatewayProcess) -> None:
        self.stack, self.fail_open = stack, fail_open
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def tenant(self, quotas: dict[str, Any]) -> str:
        name = f"dash-{secrets.token_hex(3)}"
        created = self.stack.admin(
            "POST", "/tenants", json={"name": name, "models": ["*"], "quotas": quotas}
        )
        assert created.status_code == 201, created.text
        return str(self.stack.admin("POST", f"/tenants/{name}/keys", json={}).json()["key"])

    def start(self, url: str, key: str, path: str, body: dict[str, Any], pause_s: float) -> None:
        def run() -> None:
            with httpx.Client(timeout=60) as client:
                while not self._stop.is_set():
                    answer = client.post(
                        f"{url}/v1/{path}", json=body, headers={"authorization": f"Bearer {key}"}
                    )
                    self.statuses.append(answer.status_code)
                    self._stop.wait(pause_s)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


@pytest.fixture(scope="module")
def scraped(
    real_stack: RealStack,
    fail_open_gateway: tuple[GatewayProcess, int],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PrometheusServer]:
    fail_open, fail_open_metrics = fail_open_gateway
    config = _prometheus_config(
        [f"127.0.0.1:{real_stack.up.metrics_port}", f"127.0.0.1:{fail_open_metrics}"],
        f"127.0.0.1:{real_stack.up.ray_metrics_port}",
    )
    prometheus = PrometheusServer(tmp_path_factory.mktemp("dash-prom"), config=config)
    load = Load(real_stack, fail_open)
    try:
        prometheus.wait_ready()
        stream = {
            "model": "tiny-chat",
            "max_tokens": 32,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Goedemorgen"}],
        }
        budgeted = load.tenant({"tokens_per_day": 200_000, "eur_per_month": 5})
        limited = load.tenant({"requests_per_minute": 2})
        url = real_stack.url
        for _ in range(2):
            load.start(url, real_stack.key, "chat/completions", stream, 0.1)
        load.start(url, budgeted, "chat/completions", stream, 0.3)
        load.start(url, budgeted, "embeddings", {"model": "tiny-embed", "input": "dag"}, 0.3)
        load.start(url, limited, "chat/completions", {**stream, "stream": False}, 0.5)
        too_long = {"model": "tiny-chat", "max_tokens": 4, "prompt": "sluis " * 3000}
        load.start(url, real_stack.key, "completions", too_long, 1.0)
        fail_open_key = _fail_open_tenant(fail_open)
        chat = {"model": "fake-chat", "messages": [{"role": "user", "content": "hoi"}]}
        load.start(fail_open.url, fail_open_key, "chat/completions", chat, 0.5)
        time.sleep(25)  # enough 1 s scrapes and rule evaluations for every rate window
        yield prometheus
    finally:
        load.stop()
        prometheus.stop()
    assert {200, 400, 429} <= set(load.statuses)
    assert 500 not in load.statuses


def _fail_open_tenant(gateway: GatewayProcess) -> str:
    created = admin_request(
        gateway.url, ADMIN_TOKEN, "POST", "/tenants", json={"name": "open-door", "models": ["*"]}
    )
    assert created.status_code == 201, created.text
    key = admin_request(gateway.url, ADMIN_TOKEN, "POST", "/tenants/open-door/keys", json={})
    return str(key.json()["key"])


def _has_finite_value(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


def _every_expression() -> list[expressions.Expression]:
    return [*expressions.panels(), *expressions.rules()]


@pytest.mark.parametrize("expression", _every_expression(), ids=lambda e: e.where)
def test_every_panel_and_rule_returns_data(
    scraped: PrometheusServer, expression: expressions.Expression
) -> None:
    query = expressions.concrete(expression.signal or expression.expr, rate_interval="30s")
    result = scraped.query(query)
    assert result, f"{expression.where}: no data for {query}"
    assert _has_finite_value(result), f"{expression.where}: only NaN for {query}: {result}"
    if expression.signal is not None:
        scraped.query(expression.expr)  # the alert with its threshold parses too


def test_every_metric_named_exists(scraped: PrometheusServer) -> None:
    missing = set()
    for expression in _every_expression():
        for name in _NAME.findall(expression.expr):
            if not scraped.query(f"count({name})"):
                missing.add(f"{expression.where}: {name}")
    assert not missing


def test_template_variables_list_tenants_and_models(
    scraped: PrometheusServer, real_stack: RealStack
) -> None:
    for where, query in expressions.variables():
        metric, label = expressions.label_values(query)
        values = httpx.get(
            f"{scraped.url}/api/v1/label/{label}/values", params={"match[]": metric}
        ).json()["data"]
        expected = {"tiny-chat", "tiny-embed"} if label == "model" else {"demo"}
        assert expected <= set(values), f"{where}: {values}"


def test_alerts_fire_on_provoked_failures(scraped: PrometheusServer) -> None:
    """The fail-open gateway makes SluisQuotaStoreFailingOpen pending or firing."""
    deadline = time.monotonic() + 30
    while True:
        alerts = httpx.get(f"{scraped.url}/api/v1/alerts").json()["data"]["alerts"]
        names = {alert["labels"]["alertname"] for alert in alerts}
        if "SluisQuotaStoreFailingOpen" in names or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert "SluisQuotaStoreFailingOpen" in names
    assert "SluisModelReplicaMissing" not in names
