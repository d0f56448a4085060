"""The gateway -> Ray Serve -> vLLM path, end to end, through the `openai` SDK.

One real stack for the whole session (see conftest.py). The fault tests at the end disturb it
(a replica killed), so they run last and wait for Ray Serve to bring the replica back.
"""

from __future__ import annotations

import math
import os
import secrets
import signal
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.deployments.conftest import RealStack

pytestmark = pytest.mark.real_stack


@pytest.fixture
def client(real_stack: RealStack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{real_stack.url}/v1", api_key=real_stack.key, max_retries=0
    ) as client:
        yield client


def test_chat_completion_is_served_by_vllm_and_metered(
    real_stack: RealStack, client: openai.OpenAI
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-chat", max_tokens=12, messages=[{"role": "user", "content": "Hallo!"}]
    )
    answer = raw.parse()
    assert answer.model == "tiny-chat"
    assert answer.choices[0].message.content
    assert answer.usage is not None and 0 < answer.usage.completion_tokens <= 12
    record = real_stack.record(raw.headers["x-request-id"])
    assert (record["prompt_tokens"], record["completion_tokens"]) == (
        answer.usage.prompt_tokens,
        answer.usage.completion_tokens,
    )
    assert (record["status"], record["outcome"], record["usage_exact"]) == (200, "ok", True)


def test_completion_stream_usage_equals_the_ledger(
    real_stack: RealStack, client: openai.OpenAI
) -> None:
    raw = client.completions.with_raw_response.create(
        model="tiny-chat",
        prompt="De sluis gaat open",
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"min_tokens": 24},
    )
    text, usage = "", None
    for chunk in raw.parse():
        if chunk.choices:
            text += chunk.choices[0].text
        if chunk.usage is not None:
            usage = chunk.usage
    assert text and usage is not None and usage.completion_tokens == 24
    record = real_stack.record(raw.headers["x-request-id"])
    assert (record["prompt_tokens"], record["completion_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )


def test_stream_without_usage_request_is_still_metered_exactly(real_stack: RealStack) -> None:
    with real_stack.stream(
        "chat/completions",
        {
            "model": "tiny-chat",
            "max_tokens": 16,
            "stream": True,
            "min_tokens": 16,
            "messages": [{"role": "user", "content": "Vertel iets"}],
        },
    ) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
        request_id = response.headers["x-request-id"]
    assert events[-1] == "data: [DONE]"
    assert not any('"usage":{' in event for event in events)  # not asked for: stripped
    record = real_stack.record(request_id)
    assert (record["completion_tokens"], record["usage_exact"]) == (16, True)


def test_embeddings_come_from_the_real_minilm(real_stack: RealStack, client: openai.OpenAI) -> None:
    raw = client.embeddings.with_raw_response.create(
        model="tiny-embed",
        input=[
            "A man is playing a guitar on stage.",
            "Someone performs music with a guitar.",
            "The tax office closes at five on Fridays.",
        ],
    )
    answer = raw.parse()
    vectors = [item.embedding for item in answer.data]
    assert [len(v) for v in vectors] == [384, 384, 384]
    # A sentence is nearer its paraphrase than an unrelated sentence: a real model.
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    record = real_stack.record(raw.headers["x-request-id"])
    assert record["prompt_tokens"] == answer.usage.prompt_tokens > 0


def test_prompt_beyond_the_context_is_a_400(real_stack: RealStack, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny-chat", prompt="sluis " * 3000, max_tokens=4)
    assert caught.value.status_code == 400
    assert "maximum context length" in str(caught.value)


def test_unknown_model_is_a_404(real_stack: RealStack, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-99", prompt="hi", max_tokens=4)
    assert caught.value.code == "model_not_found"


def test_one_trace_runs_from_the_client_through_the_gateway_into_vllm(
    real_stack: RealStack,
) -> None:
    """SLUIS_OTLP_ENDPOINT set: the gateway and vLLM (inside the model replica) both export,
    and vLLM's span hangs under the gateway's model call, in the client's trace."""
    trace_id = secrets.token_hex(16)
    answer = httpx.post(
        f"{real_stack.url}/v1/chat/completions",
        headers={
            "authorization": f"Bearer {real_stack.key}",
            "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01",
        },
        json={
            "model": "tiny-chat",
            "max_tokens": 6,
            "messages": [{"role": "user", "content": "geheime vraag over de sluis"}],
        },
        timeout=60,
    )
    assert answer.status_code == 200
    deadline = time.monotonic() + 30  # both export in batches, every few seconds
    while True:
        spans = {span.name: span for span in real_stack.traces.of_trace(trace_id)}
        if {"POST /v1/chat/completions", "chat tiny-chat", "llm_request"} <= set(spans):
            break
        assert time.monotonic() < deadline, f"spans of the trace so far: {sorted(spans)}"
        time.sleep(0.5)
    server, call, engine = (
        spans["POST /v1/chat/completions"],
        spans["chat tiny-chat"],
        spans["llm_request"],
    )
    assert call.parent_id == server.span_id
    assert engine.parent_id == call.span_id  # vLLM continued the gateway's context
    assert (server.service, engine.service) == ("sluis-gateway", "sluis-model-tiny-chat")
    assert call.attributes["gen_ai.usage.output_tokens"] == 6
    assert engine.attributes["gen_ai.usage.completion_tokens"] == 6
    for span in spans.values():
        assert not any("geheime" in str(value) for value in span.attributes.values())


def test_client_leaving_mid_stream_aborts_the_generation_in_vllm(real_stack: RealStack) -> None:
    def generated() -> float:
        return (
            real_stack.ray_metric("ray_vllm_generation_tokens_total", model_name="tiny-chat") or 0
        )

    before = generated()
    received = 0
    with real_stack.stream(
        "completions",
        {
            "model": "tiny-chat",
            "prompt": "Een heel lang verhaal",
            "max_tokens": 1900,
            "min_tokens": 1900,
            "stream": True,
        },
    ) as response:
        request_id = response.headers["x-request-id"]
        for line in response.iter_lines():
            if line.startswith("data: {"):
                received += 1
            if received == 5:
                break  # hang up: leaving the block closes the connection
    # vLLM's own metrics (exported through Ray): no request running any more, and the token
    # count stops far below the 1,900 asked for: the generation was aborted, not run out.
    deadline = time.monotonic() + 45
    history: list[float] = []
    while True:
        running = real_stack.ray_metric("ray_vllm_num_requests_running", model_name="tiny-chat")
        history.append(generated())
        settled = len(history) >= 4 and len(set(history[-4:])) == 1
        if running == 0 and settled:
            break
        assert time.monotonic() < deadline, f"running={running} generated={history[-4:]}"
        time.sleep(1)
    assert history[-1] - before < 1900
    record = real_stack.record(request_id)
    assert record["outcome"] == "cancelled"
    # Billed what was sent, never the 1,900 asked for.
    assert received <= record["completion_tokens"] < 1900


def test_replica_killed_mid_stream_ends_without_done_and_comes_back(
    real_stack: RealStack, client: openai.OpenAI
) -> None:
    replica = next(
        p
        for p in real_stack.up.processes()
        if "ServeReplica:sluis:model-tiny-chat" in p.name()
        or "ServeReplica:sluis:model-tiny-chat" in " ".join(p.cmdline())
    )
    lines: list[str] = []
    with real_stack.stream(
        "chat/completions",
        {
            "model": "tiny-chat",
            "max_tokens": 1900,
            "min_tokens": 1900,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "messages": [{"role": "user", "content": "Blijf praten"}],
        },
    ) as response:
        request_id = response.headers["x-request-id"]
        for line in response.iter_lines():
            if not line:
                continue  # the blank line between events: no new event, so no second kill
            lines.append(line)
            if len(lines) == 5:
                os.kill(replica.pid, signal.SIGKILL)
    assert lines[-1] != "data: [DONE]"
    assert '"error"' in lines[-1]  # a clear error event, never a made-up ending
    delivered = sum(1 for line in lines if '"delta":{"content"' in line)
    record = real_stack.record(request_id)
    assert record["outcome"] == "error"
    assert record["completion_tokens"] >= delivered - 1
    # Ray Serve starts a new replica (vLLM loads again); then requests succeed again.
    deadline = time.monotonic() + 300
    while True:
        try:
            answer = client.completions.create(model="tiny-chat", prompt="weer daar?", max_tokens=4)
            break
        except openai.APIError:
            assert time.monotonic() < deadline, "the replica did not come back"
            time.sleep(2)
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    real_stack.up.remember_processes()  # the new replica must also go at shutdown


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
