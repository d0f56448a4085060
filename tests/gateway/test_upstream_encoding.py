"""A compressing proxy between the gateway and the model server: clients still get plain JSON
and SSE, and the ledger the real token counts (the gateway asks for `identity`, and decompresses
what comes compressed anyway)."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator

import httpx
import pytest
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.fake_engine import FakeEngine
from gateway.fake_server import create_fake_server
from gateway.settings import FileConfig, ModelConfig
from tests.conftest import GatewayFactory, RunningGateway
from tests.servers import ServerThread

CHAT = {"model": "fake-chat", "max_tokens": 6, "messages": [{"role": "user", "content": "a b c"}]}


class GzipProxy:
    """gzips every answer whose request accepts gzip (`always`: every answer, as a proxy that
    ignores Accept-Encoding would), streams chunk by chunk."""

    def __init__(self, app: ASGIApp, *, always: bool) -> None:
        self.app = app
        self.always = always
        self.url = ""
        self.asked: list[str | None] = []  # each request's Accept-Encoding

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        accept = Headers(scope=scope).get("accept-encoding")
        self.asked.append(accept)
        if not (self.always or "gzip" in (accept or "")):
            await self.app(scope, receive, send)
            return
        compressor = zlib.compressobj(wbits=31)  # 31: a gzip header and trailer

        async def send_gzipped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(raw=list(message["headers"]))
                del headers["content-length"]
                headers["content-encoding"] = "gzip"
                message = {**message, "headers": headers.raw}
            elif message["type"] == "http.response.body":
                more = message.get("more_body", False)
                body = compressor.compress(message.get("body", b""))
                body += compressor.flush(zlib.Z_SYNC_FLUSH if more else zlib.Z_FINISH)
                message = {**message, "body": body}
            await send(message)

        await self.app(scope, receive, send_gzipped)


@pytest.fixture(params=[False, True], ids=["gzip-when-asked", "gzip-always"])
def proxy(request: pytest.FixtureRequest) -> Iterator[GzipProxy]:
    proxy = GzipProxy(create_fake_server(FakeEngine()), always=request.param)
    server = ServerThread(proxy).start()
    proxy.url = server.url
    yield proxy
    server.stop()


@pytest.fixture
def behind_proxy(gateway_factory: GatewayFactory, proxy: GzipProxy) -> tuple[RunningGateway, str]:
    gateway = gateway_factory(
        upstream_url=proxy.url,
        file=FileConfig(models=(ModelConfig(id="fake-chat", tokenizer="whitespace"),)),
    )
    return gateway, gateway.create_tenant("acme")


def _record(gateway: RunningGateway, request_id: str) -> dict[str, int]:
    [record] = [r for r in gateway.records() if r["request_id"] == request_id]
    return {k: record[k] for k in ("prompt_tokens", "completion_tokens")}


def test_a_whole_answer_arrives_plain_and_is_metered(
    behind_proxy: tuple[RunningGateway, str], proxy: GzipProxy
) -> None:
    gateway, key = behind_proxy
    answer = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json=CHAT,
        headers={"authorization": f"Bearer {key}", "accept-encoding": "identity"},
    )
    assert answer.status_code == 200, answer.content
    assert answer.headers.get("content-encoding", "identity") == "identity"
    usage = json.loads(answer.content)["usage"]  # the bytes as sent: plain JSON
    assert usage["completion_tokens"] == 6 and usage["prompt_tokens"] > 0
    assert _record(gateway, answer.headers["x-request-id"]) == {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": 6,
    }
    if not proxy.always:
        assert "identity" in proxy.asked


def test_a_stream_arrives_plain_and_whole_and_is_metered(
    behind_proxy: tuple[RunningGateway, str],
) -> None:
    gateway, key = behind_proxy
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}", "accept-encoding": "identity"},
    ) as answer:
        assert answer.status_code == 200
        assert answer.headers.get("content-encoding", "identity") == "identity"
        raw = answer.read()
        request_id = answer.headers["x-request-id"]
    events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    texts = [c["choices"][0]["delta"].get("content") for c in chunks if c.get("choices")]
    assert len([text for text in texts if text]) == 6
    [usage] = [c["usage"] for c in chunks if c.get("usage") and not c.get("choices")]
    assert usage["completion_tokens"] == 6
    assert _record(gateway, request_id) == {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": 6,
    }
