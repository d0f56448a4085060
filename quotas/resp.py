"""A lean, pipelined Redis client: a few connections, requests written in order on each,
replies matched in order by a reader task per connection. The quota store makes one call per
admission; redis-py spends about twice the CPU per call and, without pipelining, a connection
per call in flight (kept over redis-py by `make bench-quotas`: see README, "Quotas").

A call that times out or is cancelled gives up its place, not the connection: the reader keeps
reading and drops that reply when it comes, so every other call in flight gets its own answer.
Replies come in order, so a late one would delay those behind it: a call goes to the connection
whose oldest unanswered call is the youngest (an idle one first), so calls pass a stalled
connection by. A connection is dropped (its calls in flight fail, the next call opens it anew)
when Redis goes away, or when it has answered nothing for `dead_after_s` while calls waited.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit


class RespError(Exception):
    """Redis answered with an error reply (e.g. NOSCRIPT)."""


class RespConnection:
    """Every call answers or raises within `timeout_s` (or its own `timeout_s`)."""

    def __init__(
        self, url: str, *, timeout_s: float, connections: int = 4, dead_after_s: float = 5.0
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r} (use redis://)")
        address = _Address(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=int(parts.path.lstrip("/") or 0),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            connect_timeout_s=timeout_s,
            dead_after_s=dead_after_s,
        )
        self._timeout_s = timeout_s
        self._pipes = [_Pipe(address) for _ in range(connections)]

    async def call(self, *args: str | bytes | int | float, timeout_s: float | None = None) -> Any:
        now = time.monotonic()
        pipe = min(self._pipes, key=lambda pipe: pipe.stalled_for(now))
        async with asyncio.timeout(timeout_s or self._timeout_s):
            return await pipe.call(args)

    async def aclose(self) -> None:
        for pipe in self._pipes:
            pipe.drop(ConnectionError("closed"))


@dataclass(frozen=True)
class _Address:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    connect_timeout_s: float
    dead_after_s: float


class _Pipe:
    """One pipelined connection, opened on first use and again after it was dropped."""

    def __init__(self, address: _Address) -> None:
        self._address = address
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        # Calls in flight, in the order their replies will come: (waiter, sent at).
        self._waiters: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._last_reply = 0.0
        self._connecting: asyncio.Lock | None = None

    def stalled_for(self, now: float) -> float:
        """How long its oldest call in flight has waited with no reply since; 0 when idle."""
        if not self._waiters:
            return 0.0
        return now - max(self._waiters[0][1], self._last_reply)

    async def call(self, args: tuple[Any, ...]) -> Any:
        writer = await self._connection()
        return await self._send(writer, args)

    async def _send(self, writer: asyncio.StreamWriter, args: tuple[Any, ...]) -> Any:
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.append((waiter, time.monotonic()))
        self._write(writer, _encode(args))
        # Cancelled (the caller's timeout), the waiter is done: the reader drops its reply.
        return await waiter

    def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        """Write, or fail every waiter at once when Redis closed the connection under us
        (before the reader task noticed: uvloop then refuses the write with RuntimeError)."""
        try:
            if writer.is_closing():
                raise ConnectionError("Redis closed the connection")
            writer.write(data)
        except (RuntimeError, ConnectionError) as exc:
            error = ConnectionError(f"Redis connection lost: {exc}")
            self.drop(error)
            raise error from exc

    async def _connection(self) -> asyncio.StreamWriter:
        dead_after_s = self._address.dead_after_s
        if self._writer is not None and self.stalled_for(time.monotonic()) > dead_after_s:
            self.drop(ConnectionError(f"Redis answered nothing for {dead_after_s} s"))
        if self._writer is not None:
            return self._writer
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._writer is None:
                address = self._address
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(address.host, address.port),
                    address.connect_timeout_s,
                )
                self._reader_task = asyncio.create_task(self._read(reader))
                self._writer = writer
                try:
                    if address.password is not None:
                        auth = (
                            (address.username, address.password)
                            if address.username
                            else (address.password,)
                        )
                        await self._send(writer, ("AUTH", *auth))
                    if address.db:
                        await self._send(writer, ("SELECT", address.db))
                except BaseException:
                    self.drop(ConnectionError("Redis refused the connection set-up"))
                    raise
            return self._writer

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                reply = await _parse(reader)
                self._last_reply = time.monotonic()
                waiter, _ = self._waiters.popleft()
                if waiter.done():
                    continue  # its caller gave up on it
                if isinstance(reply, RespError):
                    waiter.set_exception(reply)
                else:
                    waiter.set_result(reply)
        except (OSError, asyncio.IncompleteReadError, IndexError, ValueError) as exc:
            self.drop(ConnectionError(f"Redis connection lost: {exc!r}"))

    def drop(self, error: Exception) -> None:
        writer, self._writer = self._writer, None
        task, self._reader_task = self._reader_task, None
        if writer is not None:
            writer.close()
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        while self._waiters:
            waiter, _ = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)
                with contextlib.suppress(BaseException):
                    waiter.exception()  # nobody may be waiting any more


def _encode(args: tuple[Any, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            data = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


async def _parse(reader: asyncio.StreamReader) -> Any:
    line = await reader.readuntil(b"\r\n")
    kind, body = line[:1], line[1:-2]
    if kind == b":":
        return int(body)
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        return RespError(body.decode())
    if kind == b"$":
        size = int(body)
        return None if size < 0 else (await reader.readexactly(size + 2))[:-2]
    if kind == b"*":
        count = int(body)
        return None if count < 0 else [await _parse(reader) for _ in range(count)]
    raise ValueError(f"unexpected Redis reply {line[:40]!r}")
