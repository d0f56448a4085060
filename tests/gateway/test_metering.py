"""The meter: batched, retried while the ledger is down, drained or spooled, never lost."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import pytest
import sqlalchemy.exc

from gateway.errors import StoreUnavailable
from gateway.metering import CANCEL_GRACE_S, Meter
from gateway.metrics import Metrics
from gateway.tenancy.errors import store_errors
from gateway.tenancy.ledger import Ledger
from gateway.usage import UsageRecord
from loadtests.processes import free_port
from quotas.admission import QuotaAdmission
from tests.conftest import GatewayFactory, RunningGateway


class FlakySink:
    """A ledger stand-in (the ledger itself is tested against real databases) that can fail."""

    def __init__(self) -> None:
        self.rows: dict[str, UsageRecord] = {}
        self.down = False
        self.attempts = 0

    async def write(self, records: Sequence[UsageRecord]) -> None:
        self.attempts += 1
        if self.down:
            raise StoreUnavailable("down")
        for record in records:
            self.rows.setdefault(record.request_id, record)


def _record(n: int) -> UsageRecord:
    return UsageRecord(
        request_id=f"req_{n}",
        tenant_id="ten_1",
        key_id="k",
        model="m",
        endpoint="completions",
        prompt_tokens=n,
        completion_tokens=2 * n,
        status=200,
        outcome="ok",
        usage_exact=True,
        ttft_ms=None,
        duration_ms=1.0,
        created_at=datetime(2026, 11, 1, tzinfo=UTC),
    )


async def test_records_are_written_in_batches(tmp_path: Path) -> None:
    sink = FlakySink()
    meter = Meter(sink, spool=tmp_path / "spool.jsonl", batch_size=50)
    await meter.start()
    for n in range(200):
        meter.record(_record(n))
    await meter.flush()
    assert len(sink.rows) == 200
    assert sink.attempts <= 5
    await meter.aclose(drain_s=1)


async def test_ledger_outage_holds_records_until_it_returns(tmp_path: Path) -> None:
    sink = FlakySink()
    meter = Meter(sink, spool=tmp_path / "spool.jsonl", retry_initial_s=0.01, retry_max_s=0.02)
    await meter.start()
    sink.down = True
    for n in range(10):
        meter.record(_record(n))
    while sink.attempts < 3:  # noqa: ASYNC110 - polling a plain counter
        await asyncio.sleep(0.01)
    assert sink.rows == {}
    sink.down = False
    await asyncio.wait_for(meter.flush(), 5)
    assert sorted(sink.rows) == sorted(f"req_{n}" for n in range(10))
    await meter.aclose(drain_s=1)


async def test_shutdown_with_ledger_down_spools_and_the_next_start_replays(tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    sink = FlakySink()
    sink.down = True
    meter = Meter(sink, spool=spool, retry_initial_s=0.01, retry_max_s=0.01)
    await meter.start()
    for n in range(7):
        meter.record(_record(n))
    await meter.aclose(drain_s=0.1)
    assert len(spool.read_text().splitlines()) == 7
    meter.record(_record(99))  # a straggler after close goes to the spool too
    assert len(spool.read_text().splitlines()) == 8

    sink.down = False
    sink.rows["req_3"] = _record(3)  # already written once: the replay must not double it
    again = Meter(sink, spool=spool)
    await again.start()
    assert not spool.exists()
    assert sorted(sink.rows) == sorted([f"req_{n}" for n in range(7)] + ["req_99"])
    assert sink.rows["req_5"] == _record(5)
    await again.aclose(drain_s=1)


# --- The meter cannot die and loses nothing -------------------------------------------------


def _failures(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "sluis_meter_write_failures_total", {"reason": reason}
    )
    return value or 0.0


def _pending(metrics: Metrics, where: str) -> float:
    value = metrics.registry.get_sample_value("sluis_meter_pending_records", {"where": where})
    assert value is not None
    return value


async def _until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not check():  # noqa: ASYNC110 - polling a plain counter
            await asyncio.sleep(0.01)


def _spooled_ids(spool: Path) -> list[str]:
    if not spool.exists():
        return []
    return [orjson.loads(line)["request_id"] for line in spool.read_bytes().splitlines() if line]


class FailingOnceSink(FlakySink):
    """Raises `error` on its first write, through store_errors() as the ledger does; then works."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    async def write(self, records: Sequence[UsageRecord]) -> None:
        self.attempts += 1
        with store_errors():
            if self.attempts == 1:
                raise self.error
        for record in records:
            self.rows.setdefault(record.request_id, record)


POOL_TIMEOUT = sqlalchemy.exc.TimeoutError(
    "QueuePool limit of size 5 overflow 10 reached, connection timed out, timeout 30.00"
)
DUPLICATE = sqlalchemy.exc.IntegrityError("INSERT INTO usage_records ...", None, Exception("dup"))


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (POOL_TIMEOUT, "unavailable"),  # a pool checkout timeout is an outage, like OSError
        (DUPLICATE, "error"),
        (RuntimeError("a bug in the sink"), "error"),
    ],
    ids=["pool-timeout", "integrity-error", "any-exception"],
)
async def test_any_ledger_error_is_held_retried_logged_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, error: Exception, reason: str
) -> None:
    sink = FailingOnceSink(error)
    metrics = Metrics()
    meter = Meter(
        sink, spool=tmp_path / "spool.jsonl", metrics=metrics, linger_s=0.01, retry_initial_s=0.01
    )
    await meter.start()
    for n in range(20):
        meter.record(_record(n))
    await asyncio.wait_for(meter.flush(), 5)
    for n in range(20, 30):  # the meter still runs after the failure
        meter.record(_record(n))
    await asyncio.wait_for(meter.flush(), 5)
    assert sorted(sink.rows) == sorted(f"req_{n}" for n in range(30))
    assert _failures(metrics, reason) == 1
    assert any(type(error).__name__ in r.getMessage() for r in caplog.records), caplog.text
    await meter.aclose(drain_s=1)
    assert not (tmp_path / "spool.jsonl").exists()


async def test_ledger_error_then_shutdown_loses_nothing_and_aclose_does_not_raise(
    tmp_path: Path,
) -> None:
    """The review's repro (C1): one pool timeout, N records, aclose(drain_s=0.2)."""
    spool = tmp_path / "spool.jsonl"
    sink = FailingOnceSink(POOL_TIMEOUT)
    meter = Meter(sink, spool=spool, linger_s=0.01)
    await meter.start()
    meter.record(_record(0))
    await asyncio.sleep(0.05)
    for n in range(1, 1001):
        meter.record(_record(n))
    await meter.aclose(drain_s=0.2)
    everything = {f"req_{n}" for n in range(1001)}
    assert set(sink.rows) | set(_spooled_ids(spool)) == everything


class BrokenSink(FlakySink):
    """A ledger that answers every write with an error that is not an outage."""

    async def write(self, records: Sequence[UsageRecord]) -> None:
        self.attempts += 1
        raise sqlalchemy.exc.ProgrammingError("INSERT ...", None, Exception("no such column"))


async def test_shutdown_with_a_failing_ledger_spools_every_record(tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    sink = BrokenSink()
    meter = Meter(sink, spool=spool, linger_s=0.01, retry_initial_s=0.01, retry_max_s=0.02)
    await meter.start()
    for n in range(50):
        meter.record(_record(n))
    await _until(lambda: sink.attempts >= 3)
    await meter.aclose(drain_s=0.2)
    assert sorted(_spooled_ids(spool)) == sorted(f"req_{n}" for n in range(50))


class CountingSink(FlakySink):
    """Counts how often each record reached the ledger."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: dict[str, int] = {}

    async def write(self, records: Sequence[UsageRecord]) -> None:
        await super().write(records)
        for record in records:
            self.writes[record.request_id] = self.writes.get(record.request_id, 0) + 1


async def test_records_past_the_memory_bound_spill_to_the_spool_and_are_replayed(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool.jsonl"
    sink = CountingSink()
    sink.down = True
    metrics = Metrics()
    meter = Meter(
        sink,
        spool=spool,
        metrics=metrics,
        batch_size=5,
        max_held=10,
        linger_s=0.01,
        retry_initial_s=0.01,
        retry_max_s=0.02,
    )
    await meter.start()
    for n in range(95):
        meter.record(_record(n))
        assert _pending(metrics, "memory") <= 10
    assert len(_spooled_ids(spool)) >= 85
    assert _pending(metrics, "memory") + _pending(metrics, "spool") == 95
    await _until(lambda: sink.attempts >= 3)
    sink.down = False
    await asyncio.wait_for(meter.flush(), 5)
    assert sorted(sink.rows) == sorted(f"req_{n}" for n in range(95))
    assert all(sink.writes[f"req_{n}"] == 1 for n in range(95))  # none written twice
    assert not spool.exists()
    assert _pending(metrics, "memory") == _pending(metrics, "spool") == 0
    await meter.aclose(drain_s=1)


async def test_a_damaged_spool_is_set_aside_line_by_line_and_start_up_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmp_path / "spool.jsonl"
    good = [orjson.dumps(_record(n).to_row()) for n in range(3)]
    unknown_field = orjson.dumps({**_record(7).to_row(), "colour": "red"})
    missing_field = orjson.dumps({k: v for k, v in _record(8).to_row().items() if k != "model"})
    not_json = b'{"request_id": "req_9", "tenant_id"'
    wrong_type = orjson.dumps({**_record(10).to_row(), "prompt_tokens": "many"})
    truncated = orjson.dumps(_record(11).to_row())[:40]  # a crash mid-append
    lines = [good[0], unknown_field, good[1], not_json, missing_field, wrong_type, good[2]]
    spool.write_bytes(b"\n".join(lines) + b"\n" + truncated)
    sink = FlakySink()
    metrics = Metrics()
    meter = Meter(sink, spool=spool, metrics=metrics)
    await asyncio.wait_for(meter.start(), 5)
    assert sorted(sink.rows) == ["req_0", "req_1", "req_2"]
    assert not spool.exists()
    rejected = spool.with_name(spool.name + ".rejected").read_bytes().splitlines()
    assert rejected == [unknown_field, not_json, missing_field, wrong_type, truncated]
    assert metrics.registry.get_sample_value("sluis_meter_set_aside_records_total") == 5
    logged = [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]
    assert len(logged) == 5, caplog.text
    assert all(str(spool) in message for message in logged)
    meter.record(_record(12))
    await asyncio.wait_for(meter.flush(), 5)
    assert "req_12" in sink.rows
    await meter.aclose(drain_s=1)


async def test_records_spooled_after_a_truncated_line_stay_whole(tmp_path: Path) -> None:
    """A record appended after a crash mid-append must not be glued to the truncated line."""
    spool = tmp_path / "spool.jsonl"
    truncated = orjson.dumps(_record(1).to_row())[:30]
    spool.write_bytes(truncated)
    sink = FlakySink()
    meter = Meter(sink, spool=spool)
    await meter.aclose(drain_s=0)  # start-up failed before the meter started
    meter.record(_record(2))  # a request that outlived it goes straight to the spool
    assert _spooled_ids_tolerant(spool) == ["req_2"]
    again = Meter(sink, spool=spool)
    await again.start()
    assert sorted(sink.rows) == ["req_2"]
    assert spool.with_name(spool.name + ".rejected").read_bytes() == truncated + b"\n"
    await again.aclose(drain_s=1)


def _spooled_ids_tolerant(spool: Path) -> list[str]:
    ids = []
    for line in spool.read_bytes().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            ids.append(orjson.loads(line)["request_id"])
    return ids


async def test_replay_with_the_ledger_down_does_not_block_start_up(tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    spool.write_bytes(b"".join(orjson.dumps(_record(n).to_row()) + b"\n" for n in range(5)))
    sink = FlakySink()
    sink.down = True
    meter = Meter(sink, spool=spool, start_wait_s=0.2, retry_initial_s=0.01, retry_max_s=0.02)
    started = time.monotonic()
    await asyncio.wait_for(meter.start(), 5)
    assert time.monotonic() - started < 1
    assert spool.exists()  # kept until the ledger has it
    meter.record(_record(5))
    sink.down = False
    await asyncio.wait_for(meter.flush(), 5)  # replayed in the background
    assert sorted(sink.rows) == sorted(f"req_{n}" for n in range(6))
    assert not spool.exists()
    await meter.aclose(drain_s=1)


class HangingSink(FlakySink):
    """A ledger that never answers (a partitioned database). `stubborn`: cancelling the write
    hangs too, as a rollback over a dead connection does on the way out."""

    def __init__(self, *, stubborn: bool) -> None:
        super().__init__()
        self.stubborn = stubborn
        self.release = asyncio.Event()
        self.finished = asyncio.Event()

    async def write(self, records: Sequence[UsageRecord]) -> None:
        self.attempts += 1
        try:
            await self.release.wait()
        finally:
            if self.stubborn:
                await self.release.wait()
            self.finished.set()


@pytest.mark.parametrize("stubborn", [False, True], ids=["hangs", "hangs-even-when-cancelled"])
async def test_shutdown_with_a_hanging_ledger_fits_its_budget_and_spools_everything(
    tmp_path: Path, stubborn: bool
) -> None:
    spool = tmp_path / "spool.jsonl"
    sink = HangingSink(stubborn=stubborn)
    meter = Meter(sink, spool=spool, linger_s=0.01, batch_size=100)
    await meter.start()
    for n in range(250):
        meter.record(_record(n))
    await _until(lambda: sink.attempts >= 1)
    started = time.monotonic()
    await asyncio.wait_for(meter.aclose(drain_s=0.3), 5)
    elapsed = time.monotonic() - started
    assert elapsed < 0.3 + CANCEL_GRACE_S + 0.2, elapsed
    assert sorted(_spooled_ids(spool)) == sorted(f"req_{n}" for n in range(250))
    sink.release.set()  # let the abandoned write end before the test's loop closes
    await asyncio.wait_for(sink.finished.wait(), 5)


# --- The gateway's shutdown -------------------------------------------------------------------


def _chat(gateway: RunningGateway, key: str) -> str:
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": "fake-chat", "messages": [{"role": "user", "content": "a b"}]},
        headers={"authorization": f"Bearer {key}"},
    )
    assert response.status_code == 200, response.text
    return response.headers["x-request-id"]


def _instances(database: Path) -> int:
    with contextlib.closing(sqlite3.connect(database)) as conn:
        count: int = conn.execute("SELECT count(*) FROM gateway_instances").fetchone()[0]
        return count


def test_shutdown_spools_usage_and_runs_every_step_even_when_one_fails(
    tmp_path: Path, gateway_factory: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Faults no real backend can be made to raise on cue are injected into the project's own
    classes: the quota store's close fails, the ledger is down."""

    async def quotas_fail(self: QuotaAdmission, *, drain_s: float) -> None:
        raise RuntimeError("quota store close failed")

    async def ledger_down(self: Ledger, records: Sequence[UsageRecord]) -> None:
        raise StoreUnavailable("down")

    monkeypatch.setattr(QuotaAdmission, "aclose", quotas_fail)
    monkeypatch.setattr(Ledger, "write", ledger_down)
    metrics_port = free_port()
    gateway = gateway_factory(metrics_port=metrics_port, shutdown_flush_s=3)
    key = gateway.create_tenant("acme")
    request_ids = [_chat(gateway, key) for _ in range(3)]
    assert _instances(tmp_path / "sluis.db") == 1
    gateway.stop()
    assert sorted(_spooled_ids(tmp_path / "state" / "usage-spool.jsonl")) == sorted(request_ids)
    assert _instances(tmp_path / "sluis.db") == 0  # instances.leave ran
    with pytest.raises(httpx.ConnectError):  # the metrics listener was stopped
        httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")


def test_shutdown_with_a_hanging_ledger_ends_within_its_budget(
    tmp_path: Path, gateway_factory: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def ledger_hangs(self: Ledger, records: Sequence[UsageRecord]) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(Ledger, "write", ledger_hangs)
    gateway = gateway_factory(shutdown_flush_s=2)
    key = gateway.create_tenant("acme")
    request_ids = [_chat(gateway, key) for _ in range(3)]
    started = time.monotonic()
    gateway.stop()
    elapsed = time.monotonic() - started
    assert elapsed < 2 + 0.5, elapsed  # uvicorn's own stop takes ~0.1 s
    assert sorted(_spooled_ids(tmp_path / "state" / "usage-spool.jsonl")) == sorted(request_ids)


async def test_two_gateways_sharing_one_spool_lose_nothing(tmp_path: Path) -> None:
    """An upgrade: the old gateway, its ledger unreachable, spills to the spool on the shared
    volume while the new one replays it."""
    spool = tmp_path / "spool.jsonl"
    old_sink, new_sink = FlakySink(), FlakySink()
    old_sink.down = True
    old = Meter(
        old_sink, spool=spool, batch_size=5, max_held=10, retry_initial_s=0.01, retry_max_s=0.02
    )
    new = Meter(new_sink, spool=spool, batch_size=5, start_wait_s=0.01, retry_max_s=0.02)
    await old.start()
    for n in range(40):
        old.record(_record(n))
    await new.start()
    for n in range(40, 400):
        old.record(_record(n))
        if n % 7 == 0:
            await asyncio.sleep(0.001)  # the new gateway replays in between
    await old.aclose(drain_s=0.05)
    await _until(lambda: len(new_sink.rows) == 400)  # found by looking at the spool again
    assert sorted(new_sink.rows) == sorted(f"req_{n}" for n in range(400))
    await _until(lambda: not spool.exists())
    await new.aclose(drain_s=1)


def test_budget_ledger_and_counters_charge_a_request_alike(gateway_factory: GatewayFactory) -> None:
    """With a per-request price, an answered request, one the engine refused (no tokens: free)
    and one it failed (billed its prompt) cost the same in the quota budget, the ledger and the
    billing counter."""
    from billing.prices import ModelPrice
    from gateway.settings import FileConfig, ModelConfig

    price = ModelPrice(
        prompt_eur_per_million=1000, completion_eur_per_million=2000, eur_per_request=0.01
    )
    gateway = gateway_factory(
        file=FileConfig(
            models=(ModelConfig(id="fake-chat", tokenizer="whitespace", max_output_tokens=16),),
            prices={"fake-chat": price},
        )
    )
    key = gateway.create_tenant("acme")
    set_budget = gateway.admin("PATCH", "/tenants/acme", json={"quotas": {"eur_per_month": 100}})
    assert set_budget.status_code == 200, set_budget.text
    statuses = []
    for content in ("a b c", "[[fail:400]]", "[[fail:401]]"):
        response = httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json={
                "model": "fake-chat",
                "max_tokens": 4,
                "messages": [{"role": "user", "content": content}],
            },
            headers={"authorization": f"Bearer {key}"},
        )
        statuses.append(response.status_code)
    assert statuses == [200, 400, 502]
    records = {r["status"]: r for r in gateway.records()}
    assert records[200]["cost_micro_eur"] == 3 * 1000 + 4 * 2000 + 10_000
    assert records[400]["cost_micro_eur"] == 0
    assert records[502]["cost_micro_eur"] == 1 * 1000 + 10_000
    charged = sum(r["cost_micro_eur"] for r in records.values())
    gateway.server.call(gateway.state.quotas.drain())
    limits = gateway.admin("GET", "/tenants/acme/quota").json()["limits"]
    [budget] = [row for row in limits if row["limit"] == "budget_money"]
    assert (budget["used"], budget["reserved"]) == (charged, 0)
    counted = gateway.state.metrics.registry.get_sample_value(
        "sluis_cost_micro_eur_total",
        {
            "tenant": "acme",
            "model": "fake-chat",
            "period": records[200]["created_at"][:7],
            "gateway": gateway.state.gateway_id,
        },
    )
    assert counted == charged
