"""Budgets are a ceiling on the real engine (vLLM CPU, the tiny model through Ray Serve): requests
without `max_tokens`, with `n=2`, streamed and not, sent concurrently, end at or under the token
and EUR budgets, and the ledger holds exactly what the clients saw."""

from __future__ import annotations

import concurrent.futures
import secrets
import time
from typing import Any

import httpx
import orjson
import pytest

from tests.deployments.conftest import RealStack

pytestmark = pytest.mark.real_stack

MAX_OUTPUT = 512  # tiny-chat's max_output_tokens in sluis.yaml (its context is 2,048)


def budgeted_tenant(stack: RealStack, quotas: dict[str, Any]) -> tuple[str, str]:
    name = f"budget-{secrets.token_hex(3)}"
    created = stack.admin("POST", "/tenants", json={"name": name, "models": ["*"]})
    assert created.status_code == 201, created.text
    patched = stack.admin("PATCH", f"/tenants/{name}", json={"quotas": quotas})
    assert patched.status_code == 200, patched.text
    key = stack.admin("POST", f"/tenants/{name}/keys", json={})
    assert key.status_code == 201, key.text
    return name, str(key.json()["key"])


def one_request(stack: RealStack, key: str, i: int) -> tuple[int, int, int]:
    """(status, prompt tokens, completion tokens) as the client saw them."""
    body: dict[str, Any] = {
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": f"Tell me about the sluis at gate {i}."}],
        "n": 1 + i % 2,
        "temperature": 1.0,
    }
    headers = {"authorization": f"Bearer {key}"}
    if i % 4 < 2:
        answer = httpx.post(
            f"{stack.url}/v1/chat/completions", json=body, headers=headers, timeout=120
        )
        if answer.status_code != 200:
            return answer.status_code, 0, 0
        usage = answer.json()["usage"]
        return 200, usage["prompt_tokens"], usage["completion_tokens"]
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream(
        "POST", f"{stack.url}/v1/chat/completions", json=body, headers=headers, timeout=120
    ) as stream:
        if stream.status_code != 200:
            stream.read()
            return stream.status_code, 0, 0
        usage = None
        for line in stream.iter_lines():
            if line.startswith("data: {"):
                usage = orjson.loads(line[6:]).get("usage") or usage
        assert usage is not None
        return 200, usage["prompt_tokens"], usage["completion_tokens"]


@pytest.mark.parametrize(
    ("quotas", "measure", "limit"),
    [
        ({"tokens_per_day": 3000}, "tokens", 3000),
        ({"eur_per_month": 0.0005}, "eur", 500),
    ],
    ids=["tokens", "eur"],
)
def test_budgets_hold_on_the_real_engine_without_max_tokens(
    real_stack: RealStack, quotas: dict[str, Any], measure: str, limit: int
) -> None:
    name, key = budgeted_tenant(real_stack, quotas)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: one_request(real_stack, key, i), range(24)))
    admitted = [r for r in results if r[0] == 200]
    assert admitted, results
    assert {status for status, _, _ in results} <= {200, 429}
    assert 429 in {status for status, _, _ in results}  # the budget was reached
    for i, (status, _, completion) in enumerate(results):
        if status == 200:  # the engine was held to the cap the gateway wrote
            assert completion <= MAX_OUTPUT * (1 + i % 2)
    records, budget = settled(real_stack, name, len(admitted))
    seen = sum(prompt + completion for _, prompt, completion in admitted)
    assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in records) == seen
    used = seen if measure == "tokens" else sum(round(r["cost_eur"] * 1_000_000) for r in records)
    assert 0 < used <= limit
    assert budget["used"] == used
    assert budget["reserved"] == 0


def settled(
    stack: RealStack, name: str, admitted: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The tenant's ledger records and its budget once every request is metered and settled."""
    deadline = time.monotonic() + 30
    while True:
        records = stack.admin("GET", "/usage/records", params={"tenant": name}).json()["data"]
        report = stack.admin("GET", f"/tenants/{name}/quota").json()["limits"]
        budget = next(row for row in report if row["kind"] == "budget" and row["scope"] == "all")
        if (len(records) >= admitted and budget["reserved"] == 0) or time.monotonic() > deadline:
            return records, budget
        time.sleep(0.2)
