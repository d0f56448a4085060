"""The engine is held to what was reserved (review H1): through the real gateway, on both stores,
against the fake engine, which like vLLM runs a request without `max_tokens` on to the context,
answers `n` times and answers each prompt of a batch."""

from __future__ import annotations

import concurrent.futures
import re
from typing import Any

import httpx
import pytest

from billing.prices import ModelPrice
from gateway.settings import FileConfig, ModelConfig
from tests.conftest import GatewayFactory, RunningGateway
from tests.gateway.errors import assert_openai_error
from tests.quotas.conftest import REDIS_URL
from tests.quotas.test_gateway_quotas import quota, set_quotas

CONTEXT = 512  # the session's fake engine (tests/conftest.py)
MODELS = (
    ModelConfig(
        id="fake-chat", tokenizer="whitespace", max_output_tokens=16, context_tokens=CONTEXT
    ),
    ModelConfig(id="fake-embed", task="embed", tokenizer="whitespace"),
)
PRICES = {"fake-chat": ModelPrice(prompt_eur_per_million=1000, completion_eur_per_million=2000)}


@pytest.fixture(params=["memory", "redis"])
def capped(request: pytest.FixtureRequest, gateway_factory: GatewayFactory) -> RunningGateway:
    redis_url = REDIS_URL if request.param == "redis" else None
    return gateway_factory(redis_url=redis_url, file=FileConfig(models=MODELS, prices=PRICES))


def post(gateway: RunningGateway, key: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/{path}",
        json={"model": "fake-chat", **body},
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )


def words(n: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": " ".join(["w"] * n)}]


def spent(gateway: RunningGateway) -> int:
    return sum(r["prompt_tokens"] + r["completion_tokens"] for r in gateway.records())


def test_a_request_without_max_tokens_gets_the_reserved_cap(capped: RunningGateway) -> None:
    gateway = capped
    key = gateway.create_tenant("acme")
    set_quotas(gateway, "acme", {"tokens_per_day": 1000})
    answer = post(gateway, key, "chat/completions", {"messages": words(3)})
    assert answer.status_code == 200, answer.text
    # Without the cap the engine would have run on to its context (509 tokens).
    assert answer.json()["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 16,
        "total_tokens": 19,
    }
    assert quota(gateway, "acme")["all:budget_tokens"]["used"] == 19 == spent(gateway)


def test_the_default_cap_never_asks_for_more_than_the_context_leaves(
    capped: RunningGateway,
) -> None:
    gateway = capped
    key = gateway.create_tenant("acme")
    # 500 prompt words: 12 tokens of context left, under the model's 16.
    answer = post(gateway, key, "completions", {"prompt": " ".join(["w"] * 500)})
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 12


def test_n_multiplies_the_reservation(capped: RunningGateway) -> None:
    gateway = capped
    key = gateway.create_tenant("acme")
    set_quotas(gateway, "acme", {"tokens_per_day": 5000})
    # The review's repro: 64 answers of 100 tokens cannot fit 5,000 tokens.
    refused = post(
        gateway, key, "chat/completions", {"messages": words(9), "n": 64, "max_tokens": 100}
    )
    error = assert_openai_error(refused, 429, "budget_tokens")
    assert error["param"] == "max_tokens"
    assert "max_tokens <= 77 fits" in str(error["message"])  # (5000 - 9) // 64
    assert gateway.records() == []
    admitted = post(
        gateway, key, "chat/completions", {"messages": words(9), "n": 64, "max_tokens": 77}
    )
    assert admitted.status_code == 200, admitted.text
    assert len(admitted.json()["choices"]) == 64
    state = quota(gateway, "acme")["all:budget_tokens"]
    assert state["used"] == 9 + 64 * 77 == spent(gateway) <= 5000
    assert state["reserved"] == 0


def test_a_batch_of_prompts_reserves_every_answer(capped: RunningGateway) -> None:
    gateway = capped
    key = gateway.create_tenant("acme")
    body = {"prompt": ["a b", "c d e"], "n": 2, "max_tokens": 5}  # 5 prompt + 4 x 5 tokens
    set_quotas(gateway, "acme", {"tokens_per_day": 24})
    assert_openai_error(post(gateway, key, "completions", body), 429, "budget_tokens")
    set_quotas(gateway, "acme", {"tokens_per_day": 25})
    answer = post(gateway, key, "completions", body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 20
    assert quota(gateway, "acme")["all:budget_tokens"]["used"] == 25


def test_token_id_prompts_count_one_token_per_id(capped: RunningGateway) -> None:
    gateway = capped
    key = gateway.create_tenant("acme")
    body = {"prompt": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], "max_tokens": 1}
    set_quotas(gateway, "acme", {"tokens_per_day": 10})
    error = assert_openai_error(post(gateway, key, "completions", body), 429, "budget_tokens")
    assert "never" in str(error["message"])


def test_a_budget_short_of_the_default_cap_names_the_max_tokens_that_fits(
    capped: RunningGateway,
) -> None:
    gateway = capped
    key = gateway.create_tenant("acme")
    set_quotas(gateway, "acme", {"tokens_per_day": 30})
    assert post(gateway, key, "chat/completions", {"messages": words(4)}).status_code == 200
    # 20 used, 10 left: 4 prompt tokens + the default 16 would overshoot.
    refused = post(gateway, key, "chat/completions", {"messages": words(4)})
    error = assert_openai_error(refused, 429, "budget_tokens")
    assert error["param"] == "max_tokens"
    assert "max_tokens <= 6 fits what is left" in str(error["message"])
    assert "named no max_tokens" in str(error["message"])
    fitting = post(gateway, key, "chat/completions", {"messages": words(4), "max_tokens": 6})
    assert fitting.status_code == 200, fitting.text
    state = quota(gateway, "acme")["all:budget_tokens"]
    assert state["used"] == 30 == spent(gateway)
    assert state["reserved"] == 0


def test_a_money_budget_names_the_max_tokens_that_fits(capped: RunningGateway) -> None:
    gateway = capped
    key = gateway.create_tenant("acme")
    # 2 prompt tokens at 1,000 micro-EUR, 16 completion tokens at 2,000: 34,000 a request.
    set_quotas(gateway, "acme", {"eur_per_month": 0.05})
    assert post(gateway, key, "chat/completions", {"messages": words(2)}).status_code == 200
    refused = post(gateway, key, "chat/completions", {"messages": words(2)})
    error = assert_openai_error(refused, 429, "budget_money")
    # 16,000 micro-EUR left: 2,000 for the prompt, 7 tokens at 2,000.
    assert "max_tokens <= 7 fits" in str(error["message"])
    ok = post(gateway, key, "chat/completions", {"messages": words(2), "max_tokens": 7})
    assert ok.status_code == 200, ok.text
    assert quota(gateway, "acme")["all:budget_money"]["used"] == 50_000


def test_concurrent_streams_without_max_tokens_end_within_the_budget(
    capped: RunningGateway,
) -> None:
    """The issue's headline: 40 concurrent streams without max_tokens against 6,000 tokens
    (44,198 before), and what the clients saw equals the ledger and the quota."""
    gateway = capped
    key = gateway.create_tenant("acme")
    set_quotas(gateway, "acme", {"tokens_per_day": 600})

    def one(i: int) -> tuple[int, int]:
        body = {
            "messages": words(4),
            "stream": i % 2 == 0,
            "n": 1 + i % 2,
            "stream_options": {"include_usage": True} if i % 2 == 0 else None,
        }
        body = {k: v for k, v in body.items() if v is not None}
        response = post(gateway, key, "chat/completions", body)
        if response.status_code != 200:
            assert_openai_error(response, 429, "budget_tokens")
            return 429, 0
        if i % 2 == 0:
            usage = [line for line in response.text.splitlines() if '"usage"' in line][-1]
            found = re.search(r'"total_tokens":(\d+)', usage)
            assert found
            return 200, int(found.group(1))
        return 200, int(response.json()["usage"]["total_tokens"])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(40)))
    seen = sum(tokens for _, tokens in results)
    assert any(status == 429 for status, _ in results)
    state = quota(gateway, "acme")["all:budget_tokens"]
    assert state["used"] == seen == spent(gateway) <= 600
    assert state["reserved"] == 0


def test_tools_and_schemas_are_part_of_the_reservation(capped: RunningGateway) -> None:
    gateway = capped
    key = gateway.create_tenant("acme")
    set_quotas(gateway, "acme", {"tokens_per_day": 200})
    tool = {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": " ".join(["word"] * 300),
            "parameters": {"type": "object", "properties": {}},
        },
    }
    body = {"messages": words(2), "tools": [tool], "max_tokens": 4}
    error = assert_openai_error(post(gateway, key, "chat/completions", body), 429, "budget_tokens")
    assert "never" in str(error["message"])
    assert gateway.records() == []
