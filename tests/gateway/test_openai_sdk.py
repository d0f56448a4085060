"""The official `openai` SDK against the real gateway on a socket, in front of a real HTTP
upstream (the fake engine served by uvicorn)."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import RunningGateway


def _client(gateway: RunningGateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)


def test_models_lists_only_the_tenants_models(gateway: RunningGateway) -> None:
    key = gateway.create_tenant("acme", ["fake-chat"])
    models = _client(gateway, key).models.list()
    assert [model.id for model in models.data] == ["fake-chat"]


def test_sync_chat_completion_is_metered_exactly(gateway: RunningGateway) -> None:
    key = gateway.create_tenant("acme")
    raw = _client(gateway, key).chat.completions.with_raw_response.create(
        model="fake-chat",
        messages=[{"role": "user", "content": "three little words"}],
        max_tokens=7,
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 7)
    request_id = raw.headers["x-request-id"]
    [record] = gateway.records(request_id=request_id)
    assert record["prompt_tokens"] == 3
    assert record["completion_tokens"] == 7
    assert record["status"] == 200
    assert record["outcome"] == "ok"
    assert record["usage_exact"] is True
    assert record["model"] == "fake-chat"
    assert record["endpoint"] == "chat/completions"


def test_sync_completion(gateway: RunningGateway) -> None:
    key = gateway.create_tenant("acme")
    completion = _client(gateway, key).completions.create(
        model="fake-chat", prompt="one two", max_tokens=4
    )
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 4
    assert len(completion.choices[0].text.split()) == 4


def test_embeddings(gateway: RunningGateway) -> None:
    key = gateway.create_tenant("acme")
    result = _client(gateway, key).embeddings.create(
        model="fake-embed", input=["een twee drie", "vier"]
    )
    assert [item.index for item in result.data] == [0, 1]
    assert len(result.data[0].embedding) == 8
    records = gateway.records()
    assert [(r["endpoint"], r["prompt_tokens"], r["completion_tokens"]) for r in records] == [
        ("embeddings", 4, 0)
    ]


def test_streaming_without_usage_request_strips_the_usage_chunk(gateway: RunningGateway) -> None:
    key = gateway.create_tenant("acme")
    chunks = list(
        _client(gateway, key).chat.completions.create(
            model="fake-chat",
            messages=[{"role": "user", "content": "a b c d"}],
            max_tokens=5,
            stream=True,
        )
    )
    assert all(chunk.choices for chunk in chunks), "a usage-only chunk leaked to the client"
    assert all(chunk.usage is None for chunk in chunks)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert len(text.split()) == 5
    [record] = gateway.records()
    assert (record["prompt_tokens"], record["completion_tokens"]) == (4, 5)
    assert record["usage_exact"] is True
    assert record["ttft_ms"] is not None


def test_streaming_with_include_usage_matches_the_ledger(gateway: RunningGateway) -> None:
    key = gateway.create_tenant("acme")
    stream = _client(gateway, key).chat.completions.create(
        model="fake-chat",
        messages=[{"role": "user", "content": "a b"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    final = chunks[-1]
    assert final.choices == []
    assert final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (2, 6)
    # Only the final chunk carries usage, as with OpenAI: the continuous usage the gateway
    # asked the upstream for is not passed on.
    assert all(chunk.usage is None for chunk in chunks[:-1])
    [record] = gateway.records()
    assert (record["prompt_tokens"], record["completion_tokens"]) == (2, 6)


@pytest.mark.asyncio
async def test_async_client_concurrent_streams_are_each_metered(gateway: RunningGateway) -> None:
    import asyncio

    key = gateway.create_tenant("acme")
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)

    async def one(n: int) -> int:
        stream = await client.completions.create(
            model="fake-chat",
            prompt=" ".join(["w"] * n),
            max_tokens=n,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        assert usage is not None
        return usage.total_tokens

    totals = await asyncio.gather(*(one(n) for n in range(1, 21)))
    await client.close()
    assert totals == [2 * n for n in range(1, 21)]
    records = gateway.records()
    assert len(records) == 20
    assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in records) == sum(totals)


def test_gateway_on_postgresql(gateway_factory, postgres_url: str) -> None:  # type: ignore[no-untyped-def]
    gateway = gateway_factory(database_url=postgres_url)
    key = gateway.create_tenant("agency")
    completion = _client(gateway, key).chat.completions.create(
        model="fake-chat",
        messages=[{"role": "user", "content": "hallo wereld"}],
        max_tokens=3,
    )
    assert completion.usage is not None
    [record] = gateway.records(tenant="agency")
    assert (record["prompt_tokens"], record["completion_tokens"]) == (2, 3)
