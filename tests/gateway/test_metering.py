"""The meter: batched, retried while the ledger is down, drained or spooled, never lost."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from gateway.errors import StoreUnavailable
from gateway.metering import Meter
from gateway.usage import UsageRecord


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
