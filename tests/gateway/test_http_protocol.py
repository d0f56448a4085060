"""The gateway's HTTP protocol sends the writes of one event-loop turn together."""

from __future__ import annotations

import asyncio
import socket

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.http_protocol import CoalescingTransport
from tests.servers import ServerThread


class RecordingTransport(asyncio.Transport):
    """What reached the socket, one entry per send."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


async def test_writes_of_one_turn_leave_in_one_send() -> None:
    raw = RecordingTransport()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.write(b"body")
    assert raw.sent == [] and transport.get_write_buffer_size() == 23
    await asyncio.sleep(0)
    assert raw.sent == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    transport.write(b"next")  # a later turn: a send of its own
    await asyncio.sleep(0)
    assert raw.sent[1:] == [b"next"]


async def test_close_sends_what_is_pending_and_abort_drops_it() -> None:
    raw = RecordingTransport()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())
    transport.write(b"last words")
    transport.close()
    assert raw.sent == [b"last words"] and raw.closed
    other = RecordingTransport()
    aborted = CoalescingTransport(other, asyncio.get_running_loop())
    aborted.write(b"never sent")
    aborted.abort()
    await asyncio.sleep(0)
    assert other.sent == [] and other.aborted


def _answer_in_one_read(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
        return client.recv(65536)


def test_a_whole_answer_arrives_at_once_and_streams_still_flow() -> None:
    async def events() -> object:
        for index in range(3):
            yield f"data: {index}\n\n".encode()
            await asyncio.sleep(0.01)

    async def whole(request: Request) -> Response:
        return PlainTextResponse("x" * 1000, status_code=429, headers={"retry-after": "1"})

    async def stream(request: Request) -> Response:
        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/whole", whole), Route("/stream", stream)])
    server = ServerThread(app).start()
    try:
        first = _answer_in_one_read(server.port, "/whole")
        assert first.startswith(b"HTTP/1.1 429") and first.endswith(b"x" * 1000)
        with httpx.stream("GET", f"{server.url}/stream") as response:
            assert list(response.iter_lines()) == ["data: 0", "", "data: 1", "", "data: 2", ""]
    finally:
        server.stop()
