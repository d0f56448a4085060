"""Streams through the real gateway: clients leaving, usage rewriting, aborting upstream."""

from __future__ import annotations

import socket
import time

import orjson
import pytest

from gateway.fake_engine import FakeEngine
from gateway.streaming import StreamMeter
from tests.conftest import GatewayFactory, RunningGateway


def _wait_for(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def _open_stream(gateway: RunningGateway, key: str, body: dict[str, object]) -> socket.socket:
    payload = orjson.dumps(body)
    sock = socket.create_connection(("127.0.0.1", gateway.server.port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
        + f"authorization: Bearer {key}\r\ncontent-length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def _slow_stream(max_tokens: int, content: str) -> dict[str, object]:
    return {
        "model": "fake-chat",
        "max_tokens": max_tokens,
        "stream": True,
        "messages": [{"role": "user", "content": content}],
    }


def _read_events(sock: socket.socket, count: int) -> bytes:
    received = b""
    while received.count(b"data: ") < count:
        chunk = sock.recv(65536)
        assert chunk, "stream closed early"
        received += chunk
    return received


def test_client_leaving_mid_stream_is_billed_what_it_received_and_aborts_upstream(
    gateway: RunningGateway, fake_engine: FakeEngine
) -> None:
    key = gateway.create_tenant("acme")
    aborted_before = fake_engine.aborted
    sock = _open_stream(gateway, key, _slow_stream(200, "one two three [[delay:0.05]]"))
    received = _read_events(sock, 5)  # the role chunk and at least four tokens
    sock.close()
    _wait_for(lambda: fake_engine.aborted == aborted_before + 1)
    _wait_for(lambda: fake_engine.running == 0)
    [record] = gateway.records()
    assert record["outcome"] == "cancelled"
    assert record["status"] == 499
    assert record["prompt_tokens"] == 4
    assert record["usage_exact"] is True
    tokens_seen = received.count(b'"content":"') - 1  # minus the empty role chunk
    assert tokens_seen <= record["completion_tokens"] < 200
    assert record["completion_tokens"] >= 4


def test_gateway_shutdown_mid_stream_drains_the_record(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(graceful_s=1)
    key = gateway.create_tenant("acme")
    sock = _open_stream(gateway, key, _slow_stream(400, "x [[delay:0.05]]"))
    received = _read_events(sock, 4)
    gateway.stop()  # SIGTERM-like: waits 1 s for the stream, then cuts it; then drains the meter
    sock.close()
    assert not (gateway.settings.state_dir / "usage-spool.jsonl").exists()
    again = gateway_factory()  # same database
    [record] = again.records()
    assert record["outcome"] == "cancelled"
    assert record["completion_tokens"] >= received.count(b'"content":"') - 1
    assert 0 < record["completion_tokens"] < 400


def _events(*chunks: dict[str, object]) -> list[bytes]:
    return [orjson.dumps(chunk) for chunk in chunks] + [b"[DONE]"]


def _chunk(text: str, completion: int) -> dict[str, object]:
    return {
        "choices": [{"index": 0, "delta": {"content": text}}],
        "usage": {"prompt_tokens": 2, "completion_tokens": completion},
    }


FINAL = {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 2}}


@pytest.mark.parametrize(
    ("wants_usage", "wants_continuous", "usage_values"),
    [(False, False, [None, None]), (True, False, [None, None, 2]), (True, True, [1, 2, 2])],
)
def test_stream_meter_gives_the_client_only_the_usage_it_asked_for(
    wants_usage: bool, wants_continuous: bool, usage_values: list[int | None]
) -> None:
    meter = StreamMeter(wants_usage=wants_usage, wants_continuous_usage=wants_continuous)
    sent = []
    for event in _events(_chunk("a", 1), _chunk(" b", 2), FINAL):
        out = meter.rewrite(event)
        if out is not None:
            sent.append(out)
            meter.commit()
    assert sent[-1] == b"data: [DONE]\n\n"
    chunks = [orjson.loads(event[6:]) for event in sent[:-1]]
    assert [c["usage"]["completion_tokens"] if c.get("usage") else None for c in chunks] == (
        usage_values
    )
    if not wants_usage:
        assert all("usage" not in c for c in chunks)
    assert (meter.prompt_tokens, meter.completion_tokens, meter.usage_exact) == (2, 2, True)


def test_stream_meter_counts_chunks_when_the_upstream_gives_no_usage() -> None:
    meter = StreamMeter(wants_usage=False, wants_continuous_usage=False)
    for text in ("a", " b", " c"):
        meter.rewrite(orjson.dumps({"choices": [{"delta": {"content": text}}]}))
        meter.commit()
    assert (meter.completion_tokens, meter.usage_exact) == (3, False)


def test_stream_meter_drops_done_after_an_error_event() -> None:
    meter = StreamMeter(wants_usage=False, wants_continuous_usage=False)
    assert meter.rewrite(b'{"error": {"message": "boom"}}') is not None
    assert meter.rewrite(b"[DONE]") is None
    assert meter.errored and not meter.done
