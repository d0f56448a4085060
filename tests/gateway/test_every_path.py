"""Every path meters and settles (review M1, M2, M4): whatever ends a request (cancellation, an
exception that is not ours, malformed usage, a timeout, a stream cut during prefill), it is on
record with its outcome and its reservation and concurrency slot are released. A request the
engine took on is billed at least its prompt."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest

from gateway.fake_engine import FakeEngine, FakeEngineConfig
from gateway.settings import FileConfig, ModelConfig, UpstreamConfig
from gateway.upstreams.base import UpstreamCall, UpstreamModel, UpstreamReply
from gateway.upstreams.fake import FakeUpstream
from tests.conftest import GatewayFactory, RunningGateway
from tests.gateway.errors import assert_openai_error
from tests.quotas.conftest import REDIS_URL
from tests.quotas.test_gateway_quotas import quota, set_quotas

MODELS = (ModelConfig(id="fake-chat", tokenizer="whitespace", max_output_tokens=8),)
PROMPT = "one two three four five"  # 5 prompt tokens, exactly as the fake engine counts


class Misbehaving:
    """The fake engine, but `send`/`stream` fail the way the test says."""

    def __init__(self, failure: str) -> None:
        self.inner = FakeUpstream(FakeEngine(FakeEngineConfig(max_context=512)))
        self.failure = failure

    async def list_models(self) -> list[UpstreamModel]:
        return await self.inner.list_models()

    async def send(self, call: UpstreamCall) -> UpstreamReply:
        if self.failure == "exception":
            raise RuntimeError("a bug in an upstream client")
        if self.failure == "cancelled":
            await asyncio.sleep(0.01)
            raise asyncio.CancelledError()
        reply = await self.inner.send(call)
        if self.failure == "malformed-usage":
            body = orjson.loads(reply.body)
            body["usage"] = {"prompt_tokens": "many", "completion_tokens": None}
            return UpstreamReply(200, orjson.dumps(body))
        return reply

    def stream(self, call: UpstreamCall) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        if self.failure == "exception":
            raise RuntimeError("a Ray error before the first byte")
        return self._stream(call)

    @asynccontextmanager
    async def _stream(self, call: UpstreamCall) -> AsyncIterator[AsyncIterator[bytes]]:
        if self.failure == "cancelled":
            await asyncio.sleep(0.01)
            raise asyncio.CancelledError()
        async with self.inner.stream(call) as events:
            yield events

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> str | None:
    return REDIS_URL if request.param == "redis" else None


def chat(gateway: RunningGateway, key: str, **extra: Any) -> httpx.Response:
    body = {"model": "fake-chat", "messages": [{"role": "user", "content": PROMPT}], **extra}
    return httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )


def limited(gateway: RunningGateway) -> str:
    key = gateway.create_tenant("acme")
    set_quotas(gateway, "acme", {"max_concurrent": 1, "tokens_per_day": 10_000})
    return key


def assert_released(gateway: RunningGateway, used: int) -> None:
    state = quota(gateway, "acme")
    assert state["all:concurrency"]["used"] == 0
    assert state["all:budget_tokens"]["reserved"] == 0
    assert state["all:budget_tokens"]["used"] == used


@pytest.mark.parametrize("stream", [False, True])
def test_an_exception_that_is_not_ours_is_metered_and_settled(
    gateway_factory: GatewayFactory, store: str | None, stream: bool
) -> None:
    gateway = gateway_factory(
        upstream=Misbehaving("exception"), redis_url=store, file=FileConfig(models=MODELS)
    )
    key = limited(gateway)
    for _ in range(2):  # the second would get 429 concurrency if the slot had leaked
        answer = chat(gateway, key, max_tokens=4, stream=stream)
        assert_openai_error(answer, 500, "internal_error")
    records = gateway.records()
    assert [(r["status"], r["outcome"]) for r in records] == [(500, "error")] * 2
    # Our own failure: nothing billed.
    assert all(r["prompt_tokens"] == r["completion_tokens"] == 0 for r in records)
    assert_released(gateway, used=0)


@pytest.mark.parametrize("stream", [False, True])
def test_a_cancelled_upstream_call_is_metered_and_settled(
    gateway_factory: GatewayFactory, store: str | None, stream: bool
) -> None:
    gateway = gateway_factory(
        upstream=Misbehaving("cancelled"), redis_url=store, file=FileConfig(models=MODELS)
    )
    key = limited(gateway)
    for _ in range(2):
        with pytest.raises(httpx.HTTPError):
            answer = chat(gateway, key, max_tokens=4, stream=stream)
            # Some servers answer 500 to a cancelled handler instead of dropping the connection.
            raise httpx.HTTPError(f"answered {answer.status_code}")
    records = gateway.records()
    assert [(r["status"], r["outcome"]) for r in records] == [(499, "cancelled")] * 2
    # It reached the engine: the prompt is billed.
    assert [(r["prompt_tokens"], r["completion_tokens"]) for r in records] == [(5, 0)] * 2
    assert_released(gateway, used=10)


def test_malformed_upstream_usage_bills_the_prompt_and_settles(
    gateway_factory: GatewayFactory, store: str | None
) -> None:
    gateway = gateway_factory(
        upstream=Misbehaving("malformed-usage"), redis_url=store, file=FileConfig(models=MODELS)
    )
    key = limited(gateway)
    for _ in range(2):
        assert chat(gateway, key, max_tokens=4).status_code == 200
    records = gateway.records()
    assert [(r["outcome"], r["usage_exact"]) for r in records] == [("ok", False)] * 2
    assert [r["prompt_tokens"] for r in records] == [5, 5]
    assert_released(gateway, used=10)


def test_a_timed_out_generation_bills_at_least_its_prompt(
    gateway_factory: GatewayFactory, store: str | None
) -> None:
    """Review M2: a non-streamed call that timed out used to bill and settle 0."""
    upstream = UpstreamConfig(kind="http", read_timeout_s=0.3)
    gateway = gateway_factory(redis_url=store, file=FileConfig(models=MODELS, upstream=upstream))
    key = limited(gateway)
    answer = chat(
        gateway,
        key,
        max_tokens=8,
        messages=[{"role": "user", "content": "one two three [[delay:0.1]]"}],
    )
    assert_openai_error(answer, 504, "upstream_timeout")
    [record] = gateway.records()
    assert (record["status"], record["outcome"], record["prompt_tokens"]) == (504, "error", 4)
    assert_released(gateway, used=4)


def leave_a_stream(
    gateway: RunningGateway, key: str, delay_s: float, after_tokens: int
) -> dict[str, Any]:
    """Stream from an upstream without continuous usage, hang up once `after_tokens` tokens
    arrived (0: at the role chunk, before any token); the request's ledger record."""
    body = {
        "model": "fake-chat",
        "max_tokens": 8,
        "stream": True,
        "messages": [{"role": "user", "content": f"one two three [[delay:{delay_s}]]"}],
    }
    received = 0
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}"},
    ) as response:
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            if '"content":"' in line and '"content":""' not in line:
                received += 1
            if received >= after_tokens:
                break
    deadline = time.monotonic() + 5
    while not gateway.records() and time.monotonic() < deadline:
        time.sleep(0.1)
    [record] = gateway.records()
    return record


def without_continuous_usage(gateway_factory: GatewayFactory, store: str | None) -> RunningGateway:
    upstream = UpstreamConfig(kind="http", continuous_usage=False)
    return gateway_factory(redis_url=store, file=FileConfig(models=MODELS, upstream=upstream))


def test_a_stream_cut_before_its_first_token_bills_the_prompt(
    gateway_factory: GatewayFactory, store: str | None
) -> None:
    """Review M4: a stream cut during prefill, on an upstream without continuous usage."""
    gateway = without_continuous_usage(gateway_factory, store)
    key = limited(gateway)
    record = leave_a_stream(gateway, key, delay_s=0.3, after_tokens=0)
    assert record["outcome"] == "cancelled"
    assert (record["prompt_tokens"], record["completion_tokens"]) == (4, 0)
    assert_released(gateway, used=4)


def test_a_stream_without_continuous_usage_left_mid_way_bills_the_prompt(
    gateway_factory: GatewayFactory, store: str | None
) -> None:
    """Review M4: the client leaves just before the final usage chunk."""
    gateway = without_continuous_usage(gateway_factory, store)
    key = limited(gateway)
    record = leave_a_stream(gateway, key, delay_s=0.05, after_tokens=3)
    assert record["outcome"] == "cancelled"
    assert record["prompt_tokens"] == 4
    assert 3 <= record["completion_tokens"] <= 4
    state = quota(gateway, "acme")
    assert state["all:budget_tokens"]["used"] == 4 + record["completion_tokens"]
