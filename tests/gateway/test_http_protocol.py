"""The gateway's HTTP protocol sends the writes of one event-loop turn together."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.app import create_app
from gateway.http_protocol import CoalescingTransport
from gateway.serve import gateway_server
from gateway.settings import Settings
from tests.conftest import ADMIN_TOKEN, RunningGateway
from tests.gateway.errors import assert_openai_error
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


# -- slow clients (the gateway's server, as `sluis gateway` builds it from its settings) --------


@pytest.fixture
def served(tmp_path: Path, fake_engine_server: ServerThread) -> Iterator[GatewayStarter]:
    started: list[RunningGateway] = []

    def start(**overrides: Any) -> RunningGateway:
        settings = Settings(
            database_url=f"sqlite+aiosqlite:///{tmp_path}/sluis.db",
            admin_token=ADMIN_TOKEN,
            state_dir=tmp_path / "state",
            upstream_url=fake_engine_server.url,
            metrics_port=0,
            **overrides,
        )
        app = create_app(settings)
        running = RunningGateway(ServerThread(app, server=gateway_server(app, settings)), settings)
        started.append(running)
        running.server.start()
        return running

    yield start
    for running in started:
        running.stop()


GatewayStarter = Callable[..., RunningGateway]


def _connect(gateway: RunningGateway) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", gateway.server.port))
    client.settimeout(10)
    return client


def _read_all(client: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    while chunk := client.recv(65536):
        received += chunk
    return received


def _trickle(client: socket.socket, parts: list[bytes], every_s: float) -> int:
    """Send the parts one by one; how many went out before the server hung up."""
    for sent, part in enumerate(parts):
        try:
            client.sendall(part)
        except OSError:
            return sent
        time.sleep(every_s)
    return len(parts)


def _openai_error(answer: bytes, status: int, code: str) -> dict[str, Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {status} "), answer
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["code"] == code and error["message"]
    return headers


def test_a_client_trickling_its_headers_is_cut_off(served: GatewayStarter) -> None:
    gateway = served(request_header_timeout_s=0.5)
    head = [b"POST /v1/chat/completions HTTP/1.1\r\n"] + [b"x-slow: 1\r\n"] * 50
    with _connect(gateway) as client:
        started = time.monotonic()
        sent = _trickle(client, head, every_s=0.1)
        answer = _read_all(client)
        assert time.monotonic() - started < 3
    assert sent < len(head)
    _openai_error(answer, 408, "request_timeout")
    with _connect(gateway) as idle:  # a connection that never sends a byte is closed as well
        assert _read_all(idle) == b""
    assert gateway.records() == []


def test_a_client_trickling_its_body_is_cut_off(served: GatewayStarter) -> None:
    gateway = served(request_body_timeout_s=0.5)
    key = gateway.create_tenant("acme")
    body = orjson.dumps(
        {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    )
    with _connect(gateway) as client:
        started = time.monotonic()
        client.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
            + f"authorization: Bearer {key}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        )
        sent = _trickle(client, [body[i : i + 1] for i in range(len(body))], every_s=0.05)
        answer = _read_all(client)
        assert time.monotonic() - started < 3
    assert sent < len(body)
    headers = _openai_error(answer, 408, "request_timeout")
    assert headers["x-request-id"].startswith("req_")
    assert gateway.records() == []
    answered = httpx.post(  # the gateway itself is fine
        f"{gateway.url}/v1/chat/completions",
        content=body,
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    assert answered.status_code == 200
    assert len(gateway.records()) == 1


def test_connections_over_the_limit_are_refused(served: GatewayStarter) -> None:
    gateway = served(max_client_connections=3)
    key = gateway.create_tenant("acme")
    request = {
        "model": "fake-chat",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
    }
    headers = {"authorization": f"Bearer {key}"}
    with contextlib.ExitStack() as idle:
        for _ in range(3):
            idle.enter_context(_connect(gateway))
        time.sleep(0.1)
        refused = httpx.post(f"{gateway.url}/v1/chat/completions", json=request, headers=headers)
    assert_openai_error(refused, 503, "server_overloaded")
    assert int(refused.headers["retry-after"]) > 0
    time.sleep(0.1)
    answered = httpx.post(f"{gateway.url}/v1/chat/completions", json=request, headers=headers)
    assert answered.status_code == 200
    assert len(gateway.records()) == 1
