"""Only fields the gateway governs reach the engine (review L3): refused fields get a 400 naming
them and cost nothing; dropped ones never reach the model server."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gateway.catalog import Model
from gateway.fields import govern_fields
from gateway.generation import plan_generation
from gateway.settings import FileConfig, ModelConfig
from gateway.tokens import count_prompt_tokens
from gateway.upstreams.base import Endpoint
from tests.conftest import GatewayFactory, RunningGateway
from tests.gateway.errors import assert_openai_error

CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "a b"}], "max_tokens": 3}


def post(
    gateway: RunningGateway, key: str, body: dict[str, Any], path: str = "chat/completions"
) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/{path}",
        json=body,
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )


@pytest.mark.parametrize(
    ("extra", "code", "param"),
    [
        ({"priority": -100}, "unsupported_parameter", "priority"),
        ({"cache_salt": "x"}, "unsupported_parameter", "cache_salt"),
        ({"ignore_eos": True}, "unsupported_parameter", "ignore_eos"),
        ({"chat_template": "{{ 7 * 7 }}"}, "unsupported_parameter", "chat_template"),
        ({"vllm_xargs": {"a": 1}}, "unsupported_parameter", "vllm_xargs"),
        ({"chat_template_kwargs": {"tools": []}}, "unsupported_parameter", "chat_template_kwargs"),
        ({"frobnicate": 1}, "unknown_parameter", "frobnicate"),
        ({"min_tokens": 4}, "invalid_value", "min_tokens"),  # beyond max_tokens 3
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is this"},
                            {"type": "image_url", "image_url": {"url": "http://10.0.0.1/x.png"}},
                        ],
                    }
                ]
            },
            "unsupported_content",
            "messages.0.content",
        ),
    ],
)
def test_engine_controls_are_refused_and_cost_nothing(
    gateway: RunningGateway, extra: dict[str, Any], code: str, param: str
) -> None:
    key = gateway.create_tenant("acme")
    error = assert_openai_error(post(gateway, key, {**CHAT, **extra}), 400, code)
    assert error["param"] == param
    assert gateway.records() == []


def test_platform_fields_are_dropped_and_allowed_ones_pass(gateway: RunningGateway) -> None:
    key = gateway.create_tenant("acme")
    body = {
        **CHAT,
        "user": "end-user-7",
        "store": True,
        "metadata": {"a": "b"},
        "temperature": 0.2,
        "seed": 7,
        "min_tokens": 2,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    answer = post(gateway, key, body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 3
    assert len(gateway.records()) == 1


def test_the_allow_list_drops_and_refuses_in_place() -> None:
    model = Model(id="m", task="generate", upstream_model="m")
    body: dict[str, Any] = {"model": "m", "prompt": "x", "user": "u", "store": False}
    govern_fields(Endpoint.COMPLETIONS, body, model)
    assert body == {"model": "m", "prompt": "x"}
    with pytest.raises(Exception, match="messages"):
        govern_fields(Endpoint.EMBEDDINGS, {"model": "m", "input": "x", "messages": []}, model)


def test_media_parts_need_a_multimodal_model_and_inline_data_unless_urls_are_allowed() -> None:
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    body = {"model": "m", "messages": [{"role": "user", "content": [part]}]}
    inline = Model(id="m", task="generate", upstream_model="m", media_tokens=600)
    govern_fields(Endpoint.CHAT, dict(body), inline)
    remote = {"type": "image_url", "image_url": {"url": "https://example.org/x.png"}}
    fetching = {"model": "m", "messages": [{"role": "user", "content": [remote]}]}
    with pytest.raises(Exception, match="inline only"):
        govern_fields(Endpoint.CHAT, fetching, inline)
    allowed = Model(id="m", task="generate", upstream_model="m", media_tokens=600, media_urls=True)
    govern_fields(Endpoint.CHAT, fetching, allowed)
    # Each media part reserves the catalog's allowance on top of its JSON.
    assert plan_generation(Endpoint.CHAT, dict(body), inline).prompt_tokens > 600


def test_the_prompt_estimate_bounds_everything_the_engine_reads() -> None:
    arguments = '{"query": "' + "x" * 3000 + '"}'
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "f", "arguments": arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "y" * 1000},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "description": "z" * 2000}}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"d": "q" * 500}}},
    }
    estimate = count_prompt_tokens(Endpoint.CHAT, body, "bytes")
    # Every byte of the tool call, the tool result, the tools and the schema is counted (the
    # review's demonstration reserved 9 tokens for such a request).
    assert estimate > 3000 + 1000 + 2000 + 500
    # Byte-level tokenizers never make more tokens than bytes: emoji and rare scripts included.
    emoji = {"messages": [{"role": "user", "content": "🦆" * 100}]}
    assert count_prompt_tokens(Endpoint.CHAT, emoji, "bytes") >= 400


def test_plan_generation_multiplies_and_caps() -> None:
    model = Model(
        id="m", task="generate", upstream_model="m", max_output_tokens=100, context_tokens=120
    )
    body: dict[str, Any] = {"prompt": ["a b c", "d"], "n": 3}
    plan = plan_generation(Endpoint.COMPLETIONS, body, model)
    assert body["max_tokens"] == 100
    assert (plan.prompt_tokens, plan.sequences, plan.completion_tokens) == (6, 6, 600)
    assert plan.defaulted
    chat: dict[str, Any] = {"messages": [{"role": "user", "content": "x" * 50}], "n": 2}
    # 50 bytes + 8 per message + 16 per request: 74 of the 120 tokens, 46 left.
    plan = plan_generation(Endpoint.CHAT, chat, model)
    assert chat["max_tokens"] == 46 and plan.completion_tokens == 92
    named: dict[str, Any] = {"messages": [], "max_tokens": 500, "max_completion_tokens": 7}
    plan = plan_generation(Endpoint.CHAT, named, model)
    # vLLM's precedence, and both names carry the one cap.
    assert named["max_tokens"] == named["max_completion_tokens"] == 7 == plan.max_tokens
    assert not plan.defaulted


def test_an_explicit_catalog_context_is_validated(gateway_factory: GatewayFactory) -> None:
    with pytest.raises(ValueError, match="below the context"):
        ModelConfig(id="m", max_output_tokens=4096, engine={"max_model_len": 2048})
    config = ModelConfig(id="m", max_output_tokens=512, engine={"max_model_len": 2048})
    assert config.context_window() == 2048
    gateway = gateway_factory(file=FileConfig(models=(config,)))
    assert gateway.state.catalog.resolve("m").context_tokens == 2048
