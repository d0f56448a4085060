"""A slow reader cannot hold a stream open for ever (review H2): a client that reads nothing
while its buffers are full is let go after `SLUIS_STREAM_IDLE_TIMEOUT_S`; the stream is billed
what the client was sent, its slot and reservation are released and the engine stops."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import orjson
import pytest

from gateway.fake_engine import FakeEngine
from gateway.settings import FileConfig, ModelConfig
from tests.conftest import GatewayFactory
from tests.quotas.conftest import REDIS_URL
from tests.quotas.test_gateway_quotas import quota, set_quotas

MODELS = (ModelConfig(id="fake-chat", tokenizer="whitespace", max_output_tokens=400),)


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_client_that_stops_reading_is_let_go(
    gateway_factory: GatewayFactory, fake_engine: FakeEngine, store: str
) -> None:
    aborted = fake_engine.aborted
    gateway = gateway_factory(
        file=FileConfig(models=MODELS),
        stream_idle_timeout_s=1.0,
        redis_url=REDIS_URL if store == "redis" else None,
    )
    key = gateway.create_tenant("acme")
    set_quotas(gateway, "acme", {"max_concurrent": 1, "tokens_per_day": 100_000})
    # 128 answers of 400 tokens: far more than the socket buffers hold.
    body = orjson.dumps(
        {
            "model": "fake-chat",
            "stream": True,
            "n": 128,
            "messages": [{"role": "user", "content": "a b c [[delay:0.01]]"}],
        }
    )
    address = urlsplit(gateway.url)
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect((address.hostname, address.port))
        client.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: sluis\r\n"
            + f"authorization: Bearer {key}\r\ncontent-type: application/json\r\n".encode()
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 20
        while not gateway.records() and time.monotonic() < deadline:
            time.sleep(0.2)  # reading nothing meanwhile
        [record] = gateway.records()
    assert record["outcome"] == "cancelled"
    assert 0 < record["completion_tokens"] < 128 * 400  # what it was sent, not the whole answer
    state = quota(gateway, "acme")
    assert state["all:concurrency"]["used"] == 0
    assert state["all:budget_tokens"]["reserved"] == 0
    assert (
        state["all:budget_tokens"]["used"] == record["prompt_tokens"] + record["completion_tokens"]
    )
    assert fake_engine.aborted == aborted + 1  # the engine stopped generating
