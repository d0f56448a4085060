"""Metering off the hot path, never losing a record.

Requests hand their `UsageRecord` to `Meter.record` (no I/O, no await). A background task writes
them to the ledger in batches; when the ledger is unreachable it keeps them and retries. On
shutdown it drains what is queued; whatever still cannot be written is spooled to a JSON-lines
file, replayed at the next start (writes are idempotent by request id, so a replay is harmless).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol

import orjson

from gateway.errors import ServiceUnavailable
from gateway.usage import UsageRecord

log = logging.getLogger("sluis.metering")


class UsageSink(Protocol):
    async def write(self, records: Sequence[UsageRecord]) -> None: ...


class Meter:
    def __init__(
        self,
        sink: UsageSink,
        *,
        spool: Path,
        batch_size: int = 500,
        linger_s: float = 0.1,
        retry_initial_s: float = 0.1,
        retry_max_s: float = 5.0,
    ) -> None:
        self._sink = sink
        self._spool = spool
        self._batch_size = batch_size
        self._linger_s = linger_s
        self._hurry = asyncio.Event()
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._queue: asyncio.Queue[UsageRecord] = asyncio.Queue()
        self._pending: list[UsageRecord] = []
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self.written = 0

    def record(self, record: UsageRecord) -> None:
        if self._closed:
            # A request that outlived shutdown: straight to the spool, never dropped.
            self._write_spool([record])
            return
        self._idle.clear()
        self._queue.put_nowait(record)

    async def start(self) -> None:
        await self._replay_spool()
        self._task = asyncio.create_task(self._run(), name="sluis-meter")

    async def flush(self) -> None:
        """Wait until everything recorded so far is in the ledger."""
        self._hurry.set()
        await self._idle.wait()

    async def aclose(self, *, drain_s: float) -> None:
        """Stop: write what is queued within `drain_s`, spool the rest to disk."""
        if self._task is not None:
            try:
                await asyncio.wait_for(self.flush(), timeout=drain_s)
            except TimeoutError:
                log.warning("ledger did not drain within %.1fs; spooling", drain_s)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._closed = True
        leftover = self._pending + _take_all(self._queue)
        self._pending = []
        if leftover:
            self._write_spool(leftover)

    async def _run(self) -> None:
        delay = self._retry_initial_s
        while True:
            if not self._pending:
                self._pending.append(await self._queue.get())
                # Linger a moment so that one transaction carries many records: a write costs
                # about the same CPU for one record as for a hundred.
                if self._queue.qsize() < self._batch_size - 1 and not self._hurry.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._hurry.wait(), self._linger_s)
            self._pending.extend(_take_all(self._queue, self._batch_size - len(self._pending)))
            try:
                await self._sink.write(self._pending)
            except ServiceUnavailable:
                log.warning("ledger unavailable; holding %d usage records", len(self._pending))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)
                continue
            self.written += len(self._pending)
            self._pending = []
            delay = self._retry_initial_s
            if self._queue.empty():
                self._hurry.clear()
                self._idle.set()

    def _write_spool(self, records: list[UsageRecord]) -> None:
        self._spool.parent.mkdir(parents=True, exist_ok=True)
        with self._spool.open("ab") as out:
            for record in records:
                out.write(orjson.dumps(record.to_row()) + b"\n")
        log.warning("spooled %d usage records to %s", len(records), self._spool)

    async def _replay_spool(self) -> None:
        if not self._spool.exists():
            return
        records = []
        for line in self._spool.read_bytes().splitlines():
            if line.strip():
                row = orjson.loads(line)
                row["created_at"] = datetime.fromisoformat(row["created_at"])
                records.append(UsageRecord(**row))
        for start in range(0, len(records), self._batch_size):
            await self._sink.write(records[start : start + self._batch_size])
        self._spool.unlink()
        log.info("replayed %d spooled usage records", len(records))


def _take_all(queue: asyncio.Queue[UsageRecord], limit: int | None = None) -> list[UsageRecord]:
    taken: list[UsageRecord] = []
    while not queue.empty() and (limit is None or len(taken) < limit):
        taken.append(queue.get_nowait())
    return taken
