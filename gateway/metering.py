"""Metering off the hot path, never losing a record.

Requests hand their `UsageRecord` to `Meter.record` (no await). A background task writes them to
the ledger in batches. Ledger writes are idempotent by request id, so the meter always prefers
writing a record twice to losing it.

- Any exception from the ledger is a failed write: the batch is held and retried with backoff,
  logged and counted (`sluis_meter_write_failures_total{reason}`). A write that hangs is given
  up after `write_timeout_s` and retried. The task itself never ends before `aclose`.
- At most `max_held` records wait in memory; past that, what waits is appended to the spool (a
  JSON-lines file) and read back once the ledger takes writes again. A crash loses at most
  `max_held` records (`sluis_meter_pending_records{where}` shows both counts).
- `aclose(drain_s)` writes what it can within `drain_s`, then appends what is still in memory to
  the spool. It returns within `drain_s + CANCEL_GRACE_S` whatever the ledger does, and never
  raises.
- The spool is replayed by the background task, in turns with new records. `start()` waits up to
  `start_wait_s` for the replay, so that counters seeded from the ledger afterwards include it;
  past that (the ledger is down or slow) start-up goes on and the replay continues in the
  background. The spool is deleted only once every line of it is in the ledger.
- A spool line that is not a usage record (truncated by a crash mid-append, bad JSON, an unknown,
  missing or mistyped field) is moved to `<spool>.rejected`, logged and counted
  (`sluis_meter_set_aside_records_total`); it never blocks start-up.
- The spool (`gateway/spool.py`) may be shared by several processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from gateway.errors import ServiceUnavailable
from gateway.metrics import Metrics
from gateway.spool import Spool
from gateway.usage import UsageRecord

log = logging.getLogger("sluis.metering")

# How long `aclose` waits for a cancelled write to end (a rollback on a dead connection may not).
CANCEL_GRACE_S = 0.5


class UsageSink(Protocol):
    async def write(self, records: Sequence[UsageRecord]) -> None: ...


class Meter:
    def __init__(
        self,
        sink: UsageSink,
        *,
        spool: Path,
        metrics: Metrics | None = None,
        batch_size: int = 500,
        linger_s: float = 0.1,
        retry_initial_s: float = 0.1,
        retry_max_s: float = 5.0,
        max_held: int = 10_000,
        write_timeout_s: float = 30.0,
        start_wait_s: float = 5.0,
    ) -> None:
        if max_held < batch_size:
            raise ValueError("max_held must be at least batch_size")
        self._sink = sink
        self._spool = Spool(spool)
        self._metrics = metrics or Metrics()
        self._batch_size = batch_size
        self._linger_s = linger_s
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._max_held = max_held
        self._spill_at = max_held
        self._write_timeout_s = write_timeout_s
        self._start_wait_s = start_wait_s
        self._held: list[UsageRecord] = []  # recorded, not yet taken by the writer
        self._batch: list[UsageRecord] = []  # being written
        self._batch_from_spool = False  # then it is still in the spool: never spool it again
        self._arrived = asyncio.Event()
        self._hurry = asyncio.Event()
        self._idle = asyncio.Event()  # nothing in memory, nothing unread in the spool
        self._idle.set()
        self._memory_clear = asyncio.Event()
        self._memory_clear.set()
        self._replayed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.written = 0
        self._metrics.meter_pending.labels("memory").set_function(lambda: self.held)
        self._metrics.meter_pending.labels("spool").set_function(lambda: self._spool.unread)

    @property
    def held(self) -> int:
        """Records only this process's memory holds."""
        return len(self._held) + (0 if self._batch_from_spool else len(self._batch))

    def unwritten(self) -> list[UsageRecord]:
        """The records only this process's memory holds (neither spooled nor, as far as it
        knows, in the ledger: the batch being written may be there already)."""
        return self._held + ([] if self._batch_from_spool else self._batch)

    def record(self, record: UsageRecord) -> None:
        if self._closed:
            # A request that outlived shutdown: straight to the spool, never dropped.
            self._spill([record])
            return
        self._held.append(record)
        self._idle.clear()
        self._memory_clear.clear()
        self._arrived.set()
        if self.held >= self._spill_at and self._held:
            held, self._held = self._held, []
            if self._spill(held):
                self._spill_at = self._max_held
                self._note_memory()
            else:  # keep them; try again once as many more have come
                self._held = held + self._held
                self._spill_at = self.held + self._max_held

    async def start(self) -> None:
        self._spool.survey()
        self._task = asyncio.create_task(self._run(), name="sluis-meter")
        self._task.add_done_callback(_task_ended)
        if self._spool.unread:
            try:
                await asyncio.wait_for(self._replayed.wait(), self._start_wait_s)
            except TimeoutError:
                log.warning(
                    "spool %s not replayed within %.1fs; replaying in the background "
                    "(%d records to go)",
                    self._spool.path,
                    self._start_wait_s,
                    self._spool.unread,
                )

    async def flush(self) -> None:
        """Wait until everything recorded so far, spooled or not, is in the ledger."""
        self._hurry.set()
        await self._idle.wait()

    async def aclose(self, *, drain_s: float) -> None:
        """Stop: write what is in memory within `drain_s`, spool the rest. Never raises."""
        try:
            if self._task is not None and not self._task.done():
                self._hurry.set()
                try:
                    await asyncio.wait_for(self._memory_clear.wait(), drain_s)
                except TimeoutError:
                    log.warning("ledger did not drain within %.1fs; spooling", drain_s)
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=CANCEL_GRACE_S)
        finally:
            self._closed = True
            leftover = self._held + ([] if self._batch_from_spool else self._batch)
            self._held, self._batch = [], []
            if leftover:
                self._spill(leftover)
            self._spool.close()
            self._memory_clear.set()

    async def _run(self) -> None:
        delay = self._retry_initial_s
        spool_turn = True  # the spool first, then in turns with new records
        while not self._closed:
            try:
                if not self._batch:
                    spool_turn = await self._take_batch(spool_turn)
                if await self._write(self._batch, delay):
                    delay = self._retry_initial_s
                    self._batch_written()
                    continue
            except Exception:
                # Never reached by a ledger error (`_write` takes them all): a bug or the disk
                # (an unreadable spool: memory gets the next turn).
                log.exception("usage meter failed; retrying in %.1fs", delay)
                self._metrics.meter_write_failures.labels("error").inc()
                spool_turn = not spool_turn
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max_s)

    async def _take_batch(self, spool_turn: bool) -> bool:
        """The next batch, into `self._batch`; returns whose turn is next."""
        while True:
            unread = self._spool.has_unread()
            if not unread:
                self._replayed.set()
            if spool_turn and unread:
                records = self._spool.read(self._batch_size, self._set_aside)
                if records:
                    self._batch, self._batch_from_spool = records, True
                    self._idle.clear()
                    self._note_memory()
                    return False
                self._spool.delete_if_done()  # it held only lines set aside
                continue
            if self._held:
                # Linger a moment so that one transaction carries many records: a write costs
                # about the same CPU for one record as for a hundred.
                if len(self._held) < self._batch_size and not self._hurry.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._hurry.wait(), self._linger_s)
                self._batch = self._held[: self._batch_size]
                del self._held[: self._batch_size]
                self._batch_from_spool = False
                return True
            if unread:
                spool_turn = True
                continue
            self._memory_clear.set()
            self._hurry.clear()
            self._idle.set()
            self._arrived.clear()
            # Now and then look at the spool again: another process may have appended to it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), self._retry_max_s)

    async def _write(self, batch: list[UsageRecord], delay: float) -> bool:
        error: Exception
        try:
            await asyncio.wait_for(self._sink.write(batch), self._write_timeout_s)
            return True
        except ServiceUnavailable as exc:
            reason, error = "unavailable", exc
        except TimeoutError as exc:
            reason, error = "timeout", exc
        except Exception as exc:
            reason, error = "error", exc
        self._metrics.meter_write_failures.labels(reason).inc()
        log.log(
            logging.ERROR if reason == "error" else logging.WARNING,
            "ledger write failed (%s); holding %d usage records, retrying in %.1fs",
            _describe(error),
            len(batch),
            delay,
            exc_info=error if reason == "error" else None,
        )
        return False

    def _batch_written(self) -> None:
        self.written += len(self._batch)
        if self._batch_from_spool:
            self._spool.delete_if_done()
        self._batch, self._batch_from_spool = [], False
        self._note_memory()

    def _note_memory(self) -> None:
        if not self.held:
            self._memory_clear.set()

    def _spill(self, records: list[UsageRecord]) -> bool:
        try:
            self._spool.append(records)
        except OSError as exc:
            log.error(
                "cannot spool %d usage records to %s (%s); they are only in memory",
                len(records),
                self._spool.path,
                exc,
            )
            return False
        log.warning("spooled %d usage records to %s", len(records), self._spool.path)
        return True

    def _set_aside(self, number: int, why: str) -> None:
        self._metrics.meter_set_aside.inc()
        log.error(
            "set aside line %d of %s (%s) in %s",
            number,
            self._spool.path,
            why,
            self._spool.rejected,
        )


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if exc.__cause__ is not None:
        text += f" (from {type(exc.__cause__).__name__}: {exc.__cause__})"
    return text


def _task_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("usage meter stopped", exc_info=task.exception())
