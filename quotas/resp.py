"""A lean, pipelined Redis client: one connection, requests written in order, replies matched in
order by a reader task. The quota store makes one call per admission; redis-py spent ~150 us of
CPU per call packing arguments and cycling its pool, this spends a fraction of that.

A call that times out leaves the connection's replies out of step, so the connection is dropped
(every waiter fails) and the next call opens a new one; so does Redis going away.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any
from urllib.parse import unquote, urlsplit


class RespError(Exception):
    """Redis answered with an error reply (e.g. NOSCRIPT)."""


class RespConnection:
    def __init__(self, url: str, *, timeout_s: float) -> None:
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r} (use redis://)")
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._db = int(parts.path.lstrip("/") or 0)
        self._password = unquote(parts.password) if parts.password else None
        self._username = unquote(parts.username) if parts.username else None
        self._timeout_s = timeout_s
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._connecting: asyncio.Lock | None = None

    async def call(self, *args: str | bytes | int | float) -> Any:
        writer = await self._connection()
        return await self._send(writer, args)

    async def aclose(self) -> None:
        self._drop(ConnectionError("closed"))

    async def _send(self, writer: asyncio.StreamWriter, args: tuple[Any, ...]) -> Any:
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._write(writer, _encode(args))
        try:
            return await asyncio.wait_for(waiter, self._timeout_s)
        except TimeoutError:
            self._drop(ConnectionError("Redis did not answer in time"))
            raise

    def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        """Write, or fail every waiter at once when Redis closed the connection under us
        (before the reader task noticed: uvloop then refuses the write with RuntimeError)."""
        try:
            if writer.is_closing():
                raise ConnectionError("Redis closed the connection")
            writer.write(data)
        except (RuntimeError, ConnectionError) as exc:
            error = ConnectionError(f"Redis connection lost: {exc}")
            self._drop(error)
            raise error from exc

    async def _connection(self) -> asyncio.StreamWriter:
        if self._writer is not None:
            return self._writer
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._writer is None:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self._host, self._port), self._timeout_s
                )
                self._reader_task = asyncio.create_task(self._read(reader))
                self._writer = writer
                try:
                    if self._password is not None:
                        auth = (
                            (self._username, self._password)
                            if self._username
                            else (self._password,)
                        )
                        await self._send(writer, ("AUTH", *auth))
                    if self._db:
                        await self._send(writer, ("SELECT", self._db))
                except BaseException:
                    self._drop(ConnectionError("Redis refused the connection set-up"))
                    raise
            return self._writer

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                reply = await _parse(reader)
                waiter = self._waiters.popleft()
                if waiter.done():
                    continue
                if isinstance(reply, RespError):
                    waiter.set_exception(reply)
                else:
                    waiter.set_result(reply)
        except (OSError, asyncio.IncompleteReadError, IndexError, ValueError) as exc:
            self._drop(ConnectionError(f"Redis connection lost: {exc!r}"))

    def _drop(self, error: Exception) -> None:
        writer, self._writer = self._writer, None
        task, self._reader_task = self._reader_task, None
        if writer is not None:
            writer.close()
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        while self._waiters:
            waiter = self._waiters.popleft()
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
