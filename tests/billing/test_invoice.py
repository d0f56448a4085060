"""`sluis invoice` reading a real Prometheus: it equals the ledger; bad input fails clearly."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from billing.invoice import Period, build_invoice
from billing.periods import month_start, period_of
from billing.prices import ModelPrice
from billing.prometheus import BillingError, PrometheusReader
from gateway.app import create_app
from gateway.cli import main
from gateway.clock import ManualClock
from gateway.settings import ConfigError, FileConfig
from loadtests.processes import free_port
from tests.clients import leave_mid_stream
from tests.conftest import ADMIN_TOKEN, GatewayFactory, RunningGateway
from tests.prometheus import PrometheusServer
from tests.servers import ServerThread

PRICES = {
    "fake-chat": ModelPrice(
        prompt_eur_per_million=2, completion_eur_per_million=6, eur_per_request=0.0001
    )
}


@pytest.fixture
def metered(
    tmp_path: Path, gateway_factory: GatewayFactory
) -> Iterator[tuple[RunningGateway, PrometheusServer]]:
    port = free_port()
    gateway = gateway_factory(metrics_port=port, file=FileConfig(prices=PRICES))
    prometheus = PrometheusServer(tmp_path / "prom", [f"127.0.0.1:{port}"])
    try:
        prometheus.wait_ready()
        yield gateway, prometheus
    finally:
        prometheus.stop()


@pytest.fixture
def cli_metered(
    metered: tuple[RunningGateway, PrometheusServer], monkeypatch: pytest.MonkeyPatch
) -> tuple[RunningGateway, PrometheusServer]:
    """The metered stack, with the CLI's environment pointing at its gateway."""
    monkeypatch.setenv("SLUIS_URL", metered[0].url)
    monkeypatch.setenv("SLUIS_ADMIN_TOKEN", ADMIN_TOKEN)
    return metered


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["invoice", *args])
    out, err = capsys.readouterr()
    return code, out, err


def reconciled(
    capsys: pytest.CaptureFixture[str], period: str, prometheus: PrometheusServer, gap_step_s: int
) -> tuple[int, dict[str, Any]]:
    """The JSON invoice with its reconciliation, and the exit code."""
    code, out, _ = invoice_of(
        capsys,
        period,
        prometheus,
        "--format",
        "json",
        "--reconcile",
        "--gap-step-seconds",
        str(gap_step_s),
    )
    report: dict[str, Any] = json.loads(out)
    return code, report


def invoice_of(
    capsys: pytest.CaptureFixture[str], period: str, prometheus: PrometheusServer, *args: str
) -> tuple[int, str, str]:
    return run(capsys, "--period", period, "--prometheus", prometheus.url, *args)


def test_invoice_equals_the_ledger(
    cli_metered: tuple[RunningGateway, PrometheusServer], capsys: pytest.CaptureFixture[str]
) -> None:
    gateway, prometheus = cli_metered
    for name, requests in (("acme", 3), ("city", 2)):
        key = gateway.create_tenant(name)
        for i in range(requests):
            body = {
                "model": "fake-chat",
                "max_tokens": 4 + i,
                "stream": i % 2 == 1,
                "messages": [{"role": "user", "content": "een twee drie"}],
            }
            httpx.post(
                f"{gateway.url}/v1/chat/completions",
                json=body,
                headers={"authorization": f"Bearer {key}"},
            ).read()
    records = gateway.records()
    expected = {}
    for tenant_name, tenant_id in (
        (t["name"], t["id"]) for t in gateway.admin("GET", "/tenants").json()["data"]
    ):
        mine = [r for r in records if r["tenant_id"] == tenant_id]
        expected[tenant_name] = {
            "prompt_tokens": sum(r["prompt_tokens"] for r in mine),
            "completion_tokens": sum(r["completion_tokens"] for r in mine),
            "requests": len(mine),
            "amount_eur": sum(r["cost_micro_eur"] for r in mine) / 1_000_000,
        }
    period = datetime.now(UTC).strftime("%Y-%m")
    deadline = time.monotonic() + 30
    while True:  # until Prometheus has scraped the last requests
        code, out, _ = invoice_of(capsys, period, prometheus, "--format", "json")
        assert code == 0
        invoice = json.loads(out)
        got = {line["tenant"]: {k: line[k] for k in expected["acme"]} for line in invoice["lines"]}
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got == expected
    assert invoice["final"] is False
    assert expected["acme"]["amount_eur"] > 0
    code, out, _ = invoice_of(capsys, period, prometheus, "--reconcile")
    assert code == 0, out
    assert "Prometheus and the ledger agree; no scrape gaps" in out
    code, out, _ = invoice_of(capsys, period, prometheus, "--tenant", "city")
    assert code == 0 and "city" in out and "acme" not in out
    code, out, _ = invoice_of(capsys, period, prometheus, "--format", "csv")
    code, html_out, _ = invoice_of(
        capsys,
        period,
        prometheus,
        "--format",
        "html",
        "--issuer",
        "Gemeente <Utrecht> & co",
    )
    assert code == 0
    assert html_out.startswith("<!DOCTYPE html>") and html_out.rstrip().endswith("</html>")
    assert f"Invoice {period}-acme" in html_out and f"Invoice {period}-city" in html_out
    assert "Gemeente &lt;Utrecht&gt; &amp; co" in html_out  # every value escaped
    assert "<script" not in html_out and "http" not in html_out  # self-contained
    assert f"{expected['acme']['amount_eur']:,.6f}" in html_out
    HTMLParser().feed(html_out)
    assert out.splitlines()[0] == (
        "tenant,model,prompt_tokens,completion_tokens,requests,amount_eur"
    )


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--period", "2026-13"], 2, "YYYY-MM"),
        (["--period", "november"], 2, "YYYY-MM"),
        (["--period", "2999-01"], 2, "not begun"),
        (["--period", "2026-01", "--tenant", "nobody"], 1, "tenant_not_found"),
        (["--period", "2026-01", "--prometheus", "http://127.0.0.1:9"], 3, "cannot reach"),
    ],
)
def test_bad_input_fails_clearly_and_prints_nothing(
    gateway: RunningGateway,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    code: int,
    message: str,
) -> None:
    monkeypatch.setenv("SLUIS_URL", gateway.url)
    monkeypatch.setenv("SLUIS_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("SLUIS_PROMETHEUS_URL", "http://127.0.0.1:9")
    got, out, err = run(capsys, *args)
    assert got == code
    assert out == ""
    assert message in err


def test_period_boundaries() -> None:
    now = datetime(2027, 1, 15, tzinfo=UTC)
    december = Period.parse("2026-12", now=now)
    assert (december.start, december.end) == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert december.closed(now)
    assert not Period.parse("2027-01", now=now).closed(now)
    with pytest.raises(BillingError):
        Period.parse("2027-02", now=now)


def test_a_prometheus_outage_is_reported_as_a_gap(
    cli_metered: tuple[RunningGateway, PrometheusServer], capsys: pytest.CaptureFixture[str]
) -> None:
    gateway, prometheus = cli_metered
    key = gateway.create_tenant("acme")
    headers = {"authorization": f"Bearer {key}"}
    body = {"model": "fake-chat", "max_tokens": 3, "messages": [{"role": "user", "content": "x"}]}
    period = datetime.now(UTC).strftime("%Y-%m")

    def chat() -> None:
        httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers)

    def scraped(requests: int) -> tuple[int, dict[str, Any]]:
        deadline = time.monotonic() + 30
        while True:  # Prometheus' first scrape of a new target comes 5-10 s after it starts
            code, report = reconciled(capsys, period, prometheus, 2)
            lines = report["lines"]
            if (lines and lines[0]["requests"] == requests) or time.monotonic() > deadline:
                return code, report
            time.sleep(0.5)

    chat()
    scraped(1)
    prometheus.pause()
    chat()  # used while nobody scrapes
    time.sleep(5)
    prometheus.resume()
    chat()
    code, report = scraped(3)
    reconciliation = report["reconciliation"]
    assert code == 4
    assert reconciliation["clean"] is False
    [gap] = reconciliation["gaps"]
    assert gap["target"] == f"127.0.0.1:{gateway.settings.metrics_port}"
    # The counters are cumulative, so even across the gap nothing is lost or doubled.
    assert reconciliation["differences"] == []


def test_invoice_after_mixed_load_and_a_restart_equals_the_ledger(
    tmp_path: Path,
    gateway_factory: GatewayFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    prometheus = PrometheusServer(tmp_path / "prom", [f"127.0.0.1:{port}"])
    try:
        prometheus.wait_ready()
        first = gateway_factory(metrics_port=port, file=FileConfig(prices=PRICES))
        monkeypatch.setenv("SLUIS_URL", first.url)
        monkeypatch.setenv("SLUIS_ADMIN_TOKEN", ADMIN_TOKEN)
        keys = {name: first.create_tenant(name) for name in ("acme", "city")}

        seen: dict[str, int] = dict.fromkeys(keys, 0)  # completion tokens clients received

        def load(gateway: RunningGateway) -> None:
            for name, key in keys.items():
                headers = {"authorization": f"Bearer {key}"}
                url = f"{gateway.url}/v1/chat/completions"
                for content, stream in (
                    ("plain words", False),
                    ("streamed words", True),
                    ("[[fail:500]]", False),
                    ("x [[break-after:2]]", True),
                ):
                    body = {
                        "model": "fake-chat",
                        "max_tokens": 5,
                        "stream": stream,
                        "messages": [{"role": "user", "content": content}],
                    }
                    seen[name] += _completion_tokens_seen(
                        httpx.post(url, json=body, headers=headers)
                    )
            for key in keys.values():  # a client that leaves mid-stream
                leave_mid_stream(gateway.url, key, max_tokens=50, delay_s=0.05)

        load(first)
        first.stop()  # restart mid-period: same database, same gateway id
        second = gateway_factory(metrics_port=port, file=FileConfig(prices=PRICES))
        monkeypatch.setenv("SLUIS_URL", second.url)
        load(second)
        records = second.records()
        assert {r["outcome"] for r in records} == {"ok", "error", "cancelled"}
        period = datetime.now(UTC).strftime("%Y-%m")
        deadline = time.monotonic() + 40
        while True:
            code, report = reconciled(capsys, period, prometheus, 30)
            if code == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert code == 0, report["reconciliation"]
        billed = {line["tenant"]: line for line in report["lines"]}
        tenants = {t["id"]: t["name"] for t in second.admin("GET", "/tenants").json()["data"]}
        for name in keys:
            mine = [r for r in records if tenants[r["tenant_id"]] == name]
            assert billed[name]["prompt_tokens"] == sum(r["prompt_tokens"] for r in mine)
            assert billed[name]["completion_tokens"] == sum(r["completion_tokens"] for r in mine)
            assert billed[name]["requests"] == len(mine)
            # What the clients saw, token for token; the client that left was billed what it
            # was sent before it left (at least the chunk it read).
            left = [r for r in mine if r["outcome"] == "cancelled"]
            assert len(left) == 2 and all(r["completion_tokens"] >= 1 for r in left)
            sent_to_leavers = sum(r["completion_tokens"] for r in left)
            assert billed[name]["completion_tokens"] == seen[name] + sent_to_leavers
    finally:
        prometheus.stop()


def _completion_tokens_seen(response: httpx.Response) -> int:
    """Completion tokens as the client saw them: the usage of a whole answer, or the text
    chunks of a stream (the fake engine sends one token per chunk)."""
    if response.status_code != 200:
        return 0
    if not response.headers["content-type"].startswith("text/event-stream"):
        return int(response.json()["usage"]["completion_tokens"])
    chunks = 0
    for line in response.text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:]).get("choices") or []:
                chunks += bool((choice.get("delta") or {}).get("content"))
    return chunks


def test_usage_no_prometheus_series_carries_is_reported_as_a_lost_series(
    tmp_path: Path,
    gateway_factory: GatewayFactory,
    postgres_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two gateways share the tenants and the ledger; Prometheus scrapes only the first. The
    second one's usage is in the ledger and in no series: named, not silently left off."""
    shared = {"database_url": postgres_url, "redis_url": "redis://127.0.0.1:6379/0"}
    port = free_port()
    scraped_gateway = gateway_factory(
        metrics_port=port, gateway_id="scraped", file=FileConfig(prices=PRICES), **shared
    )
    forgotten = gateway_factory(
        metrics_port=free_port(), gateway_id="forgotten", file=FileConfig(prices=PRICES), **shared
    )
    prometheus = PrometheusServer(tmp_path / "prom-lost", [f"127.0.0.1:{port}"])
    monkeypatch.setenv("SLUIS_URL", scraped_gateway.url)
    monkeypatch.setenv("SLUIS_ADMIN_TOKEN", ADMIN_TOKEN)
    try:
        prometheus.wait_ready()
        seen, unseen = (scraped_gateway.create_tenant(name) for name in ("seen", "unseen"))
        body = {
            "model": "fake-chat",
            "max_tokens": 3,
            "messages": [{"role": "user", "content": "x"}],
        }
        for gateway, key in ((scraped_gateway, seen), (forgotten, unseen)):
            answer = httpx.post(
                f"{gateway.url}/v1/chat/completions",
                json=body,
                headers={"authorization": f"Bearer {key}"},
            )
            assert answer.status_code == 200
        forgotten.flush()
        period = datetime.now(UTC).strftime("%Y-%m")
        deadline = time.monotonic() + 30
        while True:  # until the scraped gateway's request is in Prometheus
            code, report = reconciled(capsys, period, prometheus, 60)
            if report["lines"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert [line["tenant"] for line in report["lines"]] == ["seen"]
        assert code == 4
        # The database is the test session's: other tests' tenants may be in the ledger too.
        lost = report["reconciliation"]["lost_series"]
        ours = [entry for entry in lost if entry["tenant"] in ("seen", "unseen")]
        assert ours == [{"tenant": "unseen", "model": "fake-chat"}]
        code, out, _ = invoice_of(capsys, period, prometheus, "--reconcile")
        assert code == 4
        assert "LOST SERIES unseen / fake-chat" in out
    finally:
        prometheus.stop()


def test_usage_on_either_side_of_a_period_boundary_is_billed_to_its_own_period(
    tmp_path: Path,
    gateway_factory: GatewayFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two requests a second apart, either side of midnight at the month's start (the gateway's
    clock), both in the same scrape: each period's invoice holds exactly its own, as the ledger."""
    this_month = month_start(datetime.now(UTC))
    clock = ManualClock(this_month - timedelta(seconds=0.5))
    port = free_port()
    gateway = gateway_factory(metrics_port=port, clock=clock, file=FileConfig(prices=PRICES))
    prometheus = PrometheusServer(tmp_path / "prom-boundary", [f"127.0.0.1:{port}"])
    monkeypatch.setenv("SLUIS_URL", gateway.url)
    monkeypatch.setenv("SLUIS_ADMIN_TOKEN", ADMIN_TOKEN)
    try:
        prometheus.wait_ready()
        key = gateway.create_tenant("acme")
        for max_tokens in (3, 5):
            body = {
                "model": "fake-chat",
                "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": "een twee"}],
            }
            answer = httpx.post(
                f"{gateway.url}/v1/chat/completions",
                json=body,
                headers={"authorization": f"Bearer {key}"},
            )
            assert answer.status_code == 200
            clock.advance(1)  # across the boundary, between two scrapes
        before, after = period_of(this_month - timedelta(days=1)), period_of(this_month)
        deadline = time.monotonic() + 30
        while True:
            billed = {}
            for period in (before, after):
                code, out, _ = invoice_of(capsys, period, prometheus, "--format", "json")
                assert code == 0
                billed[period] = [
                    (line["completion_tokens"], line["requests"])
                    for line in json.loads(out)["lines"]
                ]
            if all(billed.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert billed == {before: [(3, 1)], after: [(5, 1)]}
        for period, completion in ((before, 3), (after, 5)):
            code, report = reconciled(capsys, period, prometheus, 60)
            assert code == 0, report["reconciliation"]
            assert report["lines"][0]["completion_tokens"] == completion
    finally:
        prometheus.stop()


def _chats(gateway: RunningGateway, key: str, times: int) -> None:
    for i in range(times):
        body = {
            "model": "fake-chat",
            "max_tokens": 3 + i,
            "stream": i % 2 == 1,
            "messages": [{"role": "user", "content": "een twee drie"}],
        }
        answer = httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {key}"},
        )
        assert answer.status_code == 200


def _ledger_lines(gateway: RunningGateway) -> list[dict[str, Any]]:
    """The invoice lines the ledger says (one tenant, one model)."""
    records = gateway.records()
    return [
        {
            "prompt_tokens": sum(r["prompt_tokens"] for r in records),
            "completion_tokens": sum(r["completion_tokens"] for r in records),
            "requests": len(records),
            "amount_eur": sum(r["cost_micro_eur"] for r in records) / 1_000_000,
        }
    ]


@pytest.mark.parametrize(
    ("first_id", "second_id", "same_instance"),
    [("g1", "g1", False), ("g1", "g2", True)],
    ids=["same-id-new-instance", "new-id-same-instance"],
)
def test_a_gateway_restarted_under_a_new_instance_or_id_is_billed_as_the_ledger(
    tmp_path: Path,
    gateway_factory: GatewayFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    first_id: str,
    second_id: str,
    same_instance: bool,
) -> None:
    """A restart that keeps the gateway id but is scraped at a new address (a pod's new IP) is
    billed once, not twice; one under a new id on the same address keeps what the old id
    metered. Each id's series is taken at its latest value, wherever it was scraped."""
    ports = [free_port()] if same_instance else [free_port(), free_port()]
    prometheus = PrometheusServer(tmp_path / "prom", [f"127.0.0.1:{port}" for port in ports])
    try:
        prometheus.wait_ready()
        first = gateway_factory(
            metrics_port=ports[0], gateway_id=first_id, file=FileConfig(prices=PRICES)
        )
        monkeypatch.setenv("SLUIS_URL", first.url)
        monkeypatch.setenv("SLUIS_ADMIN_TOKEN", ADMIN_TOKEN)
        key = first.create_tenant("acme")
        _chats(first, key, 4)
        before = f'sum(sluis_requests_total{{instance="127.0.0.1:{ports[0]}"}})'
        deadline = time.monotonic() + 30
        while not [s for s in prometheus.query(before) if s["value"][1] == "4"]:
            assert time.monotonic() < deadline, "Prometheus did not scrape the first gateway"
            time.sleep(0.5)
        first.stop()

        second = gateway_factory(
            metrics_port=ports[-1], gateway_id=second_id, file=FileConfig(prices=PRICES)
        )
        monkeypatch.setenv("SLUIS_URL", second.url)
        _chats(second, key, 3)
        expected = _ledger_lines(second)
        assert expected[0]["requests"] == 7
        period = datetime.now(UTC).strftime("%Y-%m")
        fields = tuple(expected[0])
        deadline = time.monotonic() + 30
        while True:  # until Prometheus has scraped the second gateway's last requests
            code, report = reconciled(capsys, period, prometheus, 30)
            billed = [{k: line[k] for k in fields} for line in report["lines"]]
            if billed == expected or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert billed == expected
        assert code == 0, report["reconciliation"]
    finally:
        prometheus.stop()


async def test_two_live_gateways_never_share_a_gateway_id(
    tmp_path: Path, gateway_factory: GatewayFactory
) -> None:
    """Each would start its counters from the other's records too: the second is refused, and
    starts once the first has left."""
    first = gateway_factory(gateway_id="g1", redis_url="redis://127.0.0.1:6379/0")
    twin = create_app(first.settings.model_copy(update={"state_dir": tmp_path / "twin"}))
    with pytest.raises(ConfigError, match=r"gateway id 'g1' is in use .*SLUIS_GATEWAY_ID"):
        async with twin.router.lifespan_context(twin):
            pass
    other = create_app(
        first.settings.model_copy(update={"state_dir": tmp_path / "other", "gateway_id": "g2"})
    )
    async with other.router.lifespan_context(other):  # another id starts beside it
        pass
    first.stop()
    async with twin.router.lifespan_context(twin):  # g1 has left: its id is free again
        pass


def _exporter(text: list[str]) -> ServerThread:
    """A /metrics endpoint serving `text[0]`, which the test changes."""

    async def metrics(_: Request) -> PlainTextResponse:
        return PlainTextResponse(text[0])

    return ServerThread(Starlette(routes=[Route("/metrics", metrics)])).start()


def _requests(*samples: tuple[int, str, str | None]) -> str:
    """`sluis_requests_total` as a gateway exports it: (value, status class, gateway id or None
    for a version without the label) per series."""
    lines = ["# TYPE sluis_requests_total counter"]
    for value, status, gateway in samples:
        labels = (
            f'tenant="acme",model="m",status="{status}",period="{period_of(datetime.now(UTC))}"'
        )
        if gateway is not None:
            labels += f',gateway="{gateway}"'
        lines.append(f"sluis_requests_total{{{labels}}} {value}")
    return "\n".join(lines) + "\n"


def test_series_from_before_the_gateway_label_are_billed_as_before(tmp_path: Path) -> None:
    """Two gateways of a version without the `gateway` label: summed per instance, as before.
    Then one is upgraded in place, its counters seeded from the same records: billed once."""
    x = [_requests((4, "2xx", None))]
    y = [_requests((2, "2xx", None), (1, "5xx", None))]
    exporters = [_exporter(x), _exporter(y)]
    prometheus = PrometheusServer(tmp_path / "prom", [f"127.0.0.1:{e.port}" for e in exporters])
    reader = PrometheusReader(prometheus.url)

    def billed() -> list[tuple[str, str, int]]:
        now = datetime.now(UTC)
        invoice = build_invoice(reader, Period.parse(period_of(now), now=now), now=now)
        return [(line.tenant, line.model, line.requests) for line in invoice.lines]

    def until(requests: int) -> list[tuple[str, str, int]]:
        deadline = time.monotonic() + 30
        while (got := billed()) != [("acme", "m", requests)] and time.monotonic() < deadline:
            time.sleep(0.5)
        return got

    try:
        prometheus.wait_ready()
        assert until(4 + 2 + 1) == [("acme", "m", 7)]
        x[0] = _requests((4 + 1, "2xx", "g1"))  # upgraded; one request since
        assert until(5 + 2 + 1) == [("acme", "m", 8)]
    finally:
        reader.close()
        prometheus.stop()
        for exporter in exporters:
            exporter.stop()
