"""A small HTTP/1.1 load generator on asyncio: keep-alive connections, closed loop (fixed
concurrency) and open loop (fixed arrival rate, latency measured from the scheduled send time, so
a slow server cannot hide its queueing: no coordinated omission)."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Target:
    host: str
    port: int
    request: bytes

    @classmethod
    def post_json(cls, url: str, body: bytes, headers: dict[str, str]) -> Target:
        parts = urlsplit(url)
        lines = [
            f"POST {parts.path} HTTP/1.1",
            f"host: {parts.netloc}",
            "content-type: application/json",
            f"content-length: {len(body)}",
        ]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        return cls(parts.hostname or "127.0.0.1", parts.port or 80, head + body)


@dataclass
class Sample:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed: float = 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("inf")
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
        return ordered[index]

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def exchange(self, request: bytes) -> int:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


class Pool:
    def __init__(self, target: Target) -> None:
        self._target = target
        self._idle: list[_Connection] = []

    async def call(self) -> int:
        connection = self._idle.pop() if self._idle else await self._connect()
        try:
            status = await connection.exchange(self._target.request)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            connection.close()
            raise
        self._idle.append(connection)
        return status

    async def _connect(self) -> _Connection:
        reader, writer = await asyncio.open_connection(self._target.host, self._target.port)
        return _Connection(reader, writer)

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()


async def closed_loop(
    target: Target,
    *,
    requests: int | None = None,
    seconds: float | None = None,
    concurrency: int = 1,
    ok_status: int = 200,
) -> Sample:
    """`concurrency` workers send back to back, for `requests` requests or `seconds` seconds."""
    pool = Pool(target)
    sample = Sample()
    remaining = requests if requests is not None else 1 << 62
    deadline = time.perf_counter() + seconds if seconds is not None else float("inf")

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            await _timed(pool.call(), sample, since=time.perf_counter(), ok_status=ok_status)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    sample.elapsed = time.perf_counter() - began
    pool.close()
    return sample


async def open_loop(
    target: Target, *, rate: float, seconds: float, give_up_s: float = 5.0
) -> Sample:
    pool = Pool(target)
    sample = Sample()
    interval = 1.0 / rate
    began = time.perf_counter()
    tasks: set[asyncio.Task[None]] = set()

    async def one(scheduled: float) -> None:
        await _timed(asyncio.wait_for(pool.call(), give_up_s), sample, since=scheduled)

    count = int(rate * seconds)
    # A collection pause in the load generator would be charged to the server under test.
    gc.disable()
    for i in range(count):
        scheduled = began + i * interval
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(set(tasks))
    sample.elapsed = time.perf_counter() - began
    gc.enable()
    pool.close()
    return sample


async def _timed(
    call: Awaitable[int], sample: Sample, *, since: float, ok_status: int = 200
) -> None:
    """Await one call; the expected status adds its latency (from `since`), any other is an
    error."""
    try:
        status = await call
    except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError):
        sample.errors += 1
        return
    if status == ok_status:
        sample.latencies.append(time.perf_counter() - since)
    else:
        sample.errors += 1
