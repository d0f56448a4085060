"""uvicorn's httptools protocol, with the writes of one event-loop turn sent together, and
limits on slow clients and on connections.

uvicorn writes a response's head and its body separately: two send() calls, on a VM two costly
system calls, for every answer (a 429, a whole completion) and the client's side wakes twice.
Here the writes made during one turn of the loop are joined and leave in one send() at the end
of that turn: a whole answer goes in one packet, and a stream's events still leave as soon as the
task that wrote them yields.

uvicorn has no read timeouts, so a client sending a byte now and then (slowloris) holds its
connection for ever, and admission, which needs the body, never counts it. Here a request's head
must arrive within `header_timeout_s` of the connection opening (on a kept-alive connection, of
the request's first byte) and its body within `body_timeout_s` of the head. A client that is
too slow gets a 408 in OpenAI's error shape, a connection that never sent a byte is just closed.
Over uvicorn's `limit_concurrency` (connections open or requests running) a request gets a 503,
also in OpenAI's shape, with `Retry-After`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, ClassVar

from starlette.types import Receive, Scope, Send
from uvicorn._types import ASGI3Application
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from gateway.errors import error_body
from gateway.middleware import new_request_id


class CoalescingTransport(asyncio.Transport):
    """A transport that gathers writes until the end of the current loop turn."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))


class GuardedHttpToolsProtocol(CoalescingHttpToolsProtocol):
    """Cuts off slow clients and refuses requests over the connection limit (module docstring).

    The limits are class attributes, set by `guarded_protocol`; None is no limit.
    """

    header_timeout_s: ClassVar[float | None] = None
    body_timeout_s: ClassVar[float | None] = None

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._timer: asyncio.TimerHandle | None = None
        self._head_begun = False
        if self.limit_concurrency is not None:
            # uvicorn's own refusal is plain text: this one is an OpenAI-style error.
            self.app = ConnectionLimit(self.app, self.limit_concurrency, server_state)
            self.limit_concurrency = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun = True
        if self._timer is None:  # a new connection's first request: timed from the connect
            self._arm(self.header_timeout_s, self._head_timed_out)

    def on_headers_complete(self) -> None:
        self._disarm()
        self._head_begun = False
        super().on_headers_complete()
        self._arm(self.body_timeout_s, self._body_timed_out)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _arm(self, delay: float | None, callback: Callable[[], None]) -> None:
        self._disarm()
        if delay is not None:
            self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # a head trickling in behind an answer: close after it
            return
        if self._head_begun:
            message = f"The request's head did not arrive within {self.header_timeout_s:g} s."
            self.transport.write(_timeout_answer(message, request_id=None))
        self.transport.close()

    def _body_timed_out(self) -> None:
        self._timer = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None:
            return
        if cycle.response_started and not cycle.response_complete:
            cycle.keep_alive = False  # answering without the whole body: close after the answer
            return
        if not cycle.response_started and not self.pipeline:
            # The application is waiting for the body: it sees the client leave, the client
            # sees why. Nothing was admitted yet, so nothing is metered.
            message = f"The request body did not arrive within {self.body_timeout_s:g} s."
            request_id = cycle.scope["state"].get("request_id")
            cycle.disconnected = True
            cycle.message_event.set()
            self.transport.write(_timeout_answer(message, request_id=request_id))
        self.transport.close()


def guarded_protocol(
    *, header_timeout_s: float | None, body_timeout_s: float | None
) -> type[GuardedHttpToolsProtocol]:
    """The gateway's protocol with these slow-client limits (uvicorn takes a class)."""
    limits = {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s}
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), limits)


class ConnectionLimit:
    """Answers 503 while more than `limit` connections are open or requests running."""

    def __init__(self, app: ASGI3Application, limit: int, server_state: ServerState) -> None:
        self.app = app
        self._limit = limit
        self._state = server_state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self._state
        if len(state.connections) <= self._limit and len(state.tasks) <= self._limit:
            await self.app(scope, receive, send)  # type: ignore[arg-type]
            return
        body = error_body(
            "The gateway is at its connection limit; try again shortly.",
            "service_unavailable_error",
            "server_overloaded",
        )
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", b"1"),
            (b"connection", b"close"),
            (b"x-request-id", new_request_id().encode()),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _timeout_answer(message: str, *, request_id: str | None) -> bytes:
    body = error_body(message, "invalid_request_error", "request_timeout")
    head = [
        b"HTTP/1.1 408 Request Timeout",
        b"content-type: application/json",
        b"content-length: " + str(len(body)).encode(),
        b"connection: close",
        b"x-request-id: " + (request_id or new_request_id()).encode(),
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body
