"""Every bad input gets its exact status and OpenAI error shape, and meters nothing twice."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import orjson
import pytest

from gateway.clock import ManualClock
from gateway.settings import FileConfig, ModelConfig
from loadtests.processes import free_port
from tests.conftest import ADMIN_TOKEN, GatewayFactory, RunningGateway
from tests.gateway.errors import assert_openai_error
from tests.servers import ServerThread

CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def post(
    gateway: RunningGateway,
    key: str | None,
    json: object = None,
    *,
    content: bytes | None = None,
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    all_headers = {"content-type": "application/json", **(headers or {})}
    if key is not None:
        all_headers["authorization"] = f"Bearer {key}"
    return httpx.post(
        gateway.url + path, json=json, content=content, headers=all_headers, timeout=30
    )


@pytest.fixture
def acme(gateway: RunningGateway) -> str:
    return gateway.create_tenant("acme", ["fake-chat"])


def test_malformed_json(gateway: RunningGateway, acme: str) -> None:
    response = post(gateway, acme, content=b'{"model": "fake-chat", "messages": [')
    error = assert_openai_error(response, 400, "invalid_json")
    assert error["type"] == "invalid_request_error"
    assert post(gateway, acme, content=b"[1, 2]").status_code == 400
    assert post(gateway, acme, content=b"").status_code == 400
    assert gateway.records() == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", "5"),
        ("stream", "yes"),
        ("messages", "hello"),
        ("model", 42),
        ("max_tokens", 0),
        ("stream_options", {"include_usage": "true"}),
        ("messages", []),
    ],
)
def test_wrong_field_types(gateway: RunningGateway, acme: str, field: str, value: object) -> None:
    response = post(gateway, acme, {**CHAT, field: value})
    error = assert_openai_error(response, 400, "invalid_value")
    assert str(error["param"]).startswith(field)
    assert gateway.records() == []


def test_missing_model(gateway: RunningGateway, acme: str) -> None:
    body = {k: v for k, v in CHAT.items() if k != "model"}
    error = assert_openai_error(post(gateway, acme, body), 400, "missing_required_parameter")
    assert error["param"] == "model"
    assert gateway.records() == []


def test_unknown_model(gateway: RunningGateway, acme: str) -> None:
    error = assert_openai_error(
        post(gateway, acme, {**CHAT, "model": "gpt-9"}), 404, "model_not_found"
    )
    assert error["param"] == "model"
    assert gateway.records() == []


def test_model_not_allowed(gateway: RunningGateway, acme: str) -> None:
    response = post(gateway, acme, {"model": "fake-embed", "input": "x"}, path="/v1/embeddings")
    assert_openai_error(response, 403, "model_not_allowed")
    assert gateway.records() == []


def test_body_over_the_limit_with_content_length(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(max_body_bytes=4096)
    key = gateway.create_tenant("acme")
    big = {**CHAT, "messages": [{"role": "user", "content": "x " * 5000}]}
    assert_openai_error(post(gateway, key, big), 413, "request_too_large")
    assert gateway.records() == []


def test_chunked_body_over_the_limit_is_cut_off(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(max_body_bytes=4096)
    key = gateway.create_tenant("acme")
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(64):
            sent += 1024
            yield b" " * 1024

    try:
        response = httpx.post(
            gateway.url + "/v1/chat/completions",
            content=body(),
            headers={"authorization": f"Bearer {key}"},
            timeout=30,
        )
    except httpx.WriteError:  # the gateway answered and closed before the upload finished
        pass
    else:
        assert_openai_error(response, 413, "request_too_large")
    assert gateway.records() == []


@pytest.mark.asyncio
async def test_body_reading_stops_right_after_the_limit() -> None:
    from starlette.requests import Request

    from gateway.body import read_limited_body
    from gateway.errors import PayloadTooLarge

    pulled = 0

    async def receive() -> dict[str, object]:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

    request = Request({"type": "http", "headers": [], "method": "POST"}, receive)
    with pytest.raises(PayloadTooLarge):
        await read_limited_body(request, 4500)
    assert pulled == 5  # 5,000 bytes read: over 4,500, and not one chunk more


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        (None, "missing_api_key"),
        ("Basic abc", "missing_api_key"),
        ("Bearer not-a-key", "invalid_api_key"),
        ("Bearer sk-sluis-short-abc", "invalid_api_key"),
    ],
)
def test_missing_or_malformed_key_never_reaches_the_store(
    gateway: RunningGateway,
    authorization: str | None,
    code: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lookups = 0
    original = gateway.state.tenants.grant_for

    async def counting(public_id: str):  # type: ignore[no-untyped-def]
        nonlocal lookups
        lookups += 1
        return await original(public_id)

    monkeypatch.setattr(gateway.state.tenants, "grant_for", counting)
    headers = {"authorization": authorization} if authorization else {}
    response = post(gateway, None, CHAT, headers=headers)
    assert_openai_error(response, 401, code)
    assert lookups == 0
    assert gateway.records() == []


def test_unknown_key_and_wrong_secret(gateway: RunningGateway, acme: str) -> None:
    unknown = "sk-sluis-aaaaaaaaaaaa-" + "A" * 40
    assert_openai_error(post(gateway, unknown, CHAT), 401, "invalid_api_key")
    wrong_secret = acme[:-4] + ("AAAA" if not acme.endswith("AAAA") else "BBBB")
    assert_openai_error(post(gateway, wrong_secret, CHAT), 401, "invalid_api_key")
    assert gateway.records() == []


def test_a_flood_of_one_unknown_key_costs_one_lookup(
    gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups = 0
    original = gateway.state.tenants.grant_for

    async def counting(public_id: str):  # type: ignore[no-untyped-def]
        nonlocal lookups
        lookups += 1
        return await original(public_id)

    monkeypatch.setattr(gateway.state.tenants, "grant_for", counting)
    unknown = "sk-sluis-bbbbbbbbbbbb-" + "A" * 40
    for _ in range(20):
        assert_openai_error(post(gateway, unknown, CHAT), 401, "invalid_api_key")
    assert lookups == 1
    assert gateway.records() == []


def test_revoked_key_is_refused_at_once(gateway: RunningGateway, acme: str) -> None:
    assert post(gateway, acme, CHAT).status_code == 200
    [key] = gateway.admin("GET", "/tenants/acme/keys").json()["data"]
    assert gateway.admin("DELETE", f"/keys/{key['id']}").status_code == 200
    assert_openai_error(post(gateway, acme, CHAT), 401, "api_key_revoked")
    assert len(gateway.records()) == 1


def test_expired_key(gateway_factory: GatewayFactory) -> None:
    clock = ManualClock()
    gateway = gateway_factory(clock=clock)
    gateway.admin("POST", "/tenants", json={"name": "acme", "models": ["*"]})
    key = gateway.admin("POST", "/tenants/acme/keys", json={"expires_in_s": 60}).json()["key"]
    assert post(gateway, key, CHAT).status_code == 200
    clock.advance(61)
    assert_openai_error(post(gateway, key, CHAT), 401, "api_key_expired")
    assert len(gateway.records()) == 1


def test_suspended_tenant(gateway: RunningGateway, acme: str) -> None:
    gateway.admin("PATCH", "/tenants/acme", json={"status": "suspended"})
    assert_openai_error(post(gateway, acme, CHAT), 403, "tenant_suspended")
    models = httpx.get(gateway.url + "/v1/models", headers={"authorization": f"Bearer {acme}"})
    assert_openai_error(models, 403, "tenant_suspended")
    gateway.admin("PATCH", "/tenants/acme", json={"status": "active"})
    assert post(gateway, acme, CHAT).status_code == 200
    assert len(gateway.records()) == 1


ADMIN_ROUTES = [
    ("GET", "/readyz"),
    ("POST", "/tenants"),
    ("GET", "/tenants"),
    ("GET", "/tenants/acme"),
    ("PATCH", "/tenants/acme"),
    ("POST", "/tenants/acme/keys"),
    ("GET", "/tenants/acme/keys"),
    ("DELETE", "/keys/abc"),
    ("POST", "/keys/abc/rotate"),
    ("GET", "/usage"),
    ("GET", "/usage/records"),
    ("GET", "/audit"),
    ("GET", "/no-such-route"),
]


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_tenant_key_on_admin_routes(
    gateway: RunningGateway, acme: str, method: str, path: str
) -> None:
    response = httpx.request(
        method,
        f"{gateway.url}/admin/v1{path}",
        json={},
        headers={"authorization": f"Bearer {acme}"},
    )
    assert_openai_error(response, 403, "admin_only")
    no_token = httpx.request(method, f"{gateway.url}/admin/v1{path}", json={})
    assert_openai_error(no_token, 401, "missing_admin_token")
    wrong = httpx.request(
        method,
        f"{gateway.url}/admin/v1{path}",
        json={},
        headers={"authorization": f"Bearer {ADMIN_TOKEN}x"},
    )
    assert_openai_error(wrong, 401, "invalid_admin_token")
    assert gateway.admin("GET", "/audit").json()["data"][0]["action"] == "key.create"


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_down(gateway_factory: GatewayFactory, stream: bool) -> None:
    gateway = gateway_factory(
        upstream_url=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        file=FileConfig(models=(ModelConfig(id="fake-chat"),)),
    )
    key = gateway.create_tenant("acme")
    response = post(gateway, key, {**CHAT, "stream": stream})
    error = assert_openai_error(response, 503, "upstream_unavailable")
    assert error["type"] == "service_unavailable_error"
    assert int(response.headers["retry-after"]) > 0
    ready = httpx.get(gateway.url + "/readyz")
    assert ready.status_code == 503
    # On record as an error that cost nothing: the engine never received it.
    [record] = gateway.records()
    assert (record["status"], record["outcome"]) == (503, "error")
    assert record["prompt_tokens"] == record["completion_tokens"] == 0


def test_upstream_break_mid_stream_ends_without_done(gateway: RunningGateway, acme: str) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=acme, max_retries=0)
    received: list[str] = []
    with pytest.raises(openai.APIError, match="broke off"):
        for chunk in client.chat.completions.create(
            model="fake-chat",
            max_tokens=10,
            stream=True,
            messages=[{"role": "user", "content": "tell me [[break-after:3]]"}],
        ):
            received.append(chunk.choices[0].delta.content or "")
    assert len("".join(received).split()) == 3
    raw = post(
        gateway,
        acme,
        {
            **CHAT,
            "max_tokens": 10,
            "stream": True,
            "messages": [{"role": "user", "content": "[[break-after:3]]"}],
        },
    )
    assert raw.status_code == 200
    assert b"[DONE]" not in raw.content
    assert raw.content.rstrip().endswith(b"}")
    records = gateway.records()
    assert len(records) == 2
    for record in records:
        assert (record["completion_tokens"], record["outcome"], record["status"]) == (
            3,
            "error",
            502,
        )


def test_upstream_error_event_mid_stream_is_passed_without_done(
    gateway: RunningGateway, acme: str
) -> None:
    raw = post(
        gateway,
        acme,
        {
            **CHAT,
            "max_tokens": 10,
            "stream": True,
            "messages": [{"role": "user", "content": "x [[error-after:2]]"}],
        },
    )
    assert raw.status_code == 200
    assert b"[DONE]" not in raw.content
    assert b'"error"' in raw.content
    [record] = gateway.records()
    assert (record["completion_tokens"], record["outcome"]) == (2, "error")


def test_upstream_rejects_context_overflow_with_400(gateway: RunningGateway, acme: str) -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": "w " * 600}]}  # context: 512
    error = assert_openai_error(post(gateway, acme, body), 400, "upstream_rejected")
    assert "context length" in str(error["message"])
    streamed = post(gateway, acme, {**body, "stream": True})
    assert_openai_error(streamed, 400, "upstream_rejected")
    records = gateway.records()
    assert [(r["status"], r["prompt_tokens"] + r["completion_tokens"]) for r in records] == [
        (400, 0),
        (400, 0),
    ]


def test_upstream_rejection_names_nothing_the_catalog_does_not_own(
    gateway_factory: GatewayFactory,
) -> None:
    # The engine does not serve the upstream name the catalog maps to: its 404 names that name.
    gateway = gateway_factory(
        file=FileConfig(
            models=(ModelConfig(id="fake-chat"), ModelConfig(id="ours", upstream_model="/srv/x-7b"))
        )
    )
    key = gateway.create_tenant("acme")
    for stream in (False, True):
        response = post(gateway, key, {**CHAT, "model": "ours", "stream": stream})
        error = assert_openai_error(response, 404, "upstream_rejected")
        assert error["type"] == "invalid_request_error"
        assert error["param"] is None
        assert "/srv" not in response.text and "x-7b" not in response.text
        assert "model_not_found" not in response.text  # the engine's own code is not ours
    records = gateway.records()
    assert [(r["status"], r["prompt_tokens"] + r["completion_tokens"]) for r in records] == [
        (404, 0),
        (404, 0),
    ]


@pytest.mark.parametrize(
    ("message", "passed"),
    [
        (  # vLLM's, before and after 0.9: what a tenant needs to shorten its request
            "This model's maximum context length is 2048 tokens. However, you requested 100010 "
            "tokens (10 in the messages, 100000 in the completion). Please reduce the length of "
            "the messages or completion.",
            True,
        ),
        (
            "'max_tokens' or 'max_completion_tokens' is too large: 100000. This model's maximum "
            "context length is 2048 tokens and your request has 10 input tokens "
            "(100000 > 2048 - 10).",
            True,
        ),
        ("The model `meta-llama/Llama-3-70B` does not exist.", False),
        ("maximum context length of /srv/models/llama-70b is 2048 tokens", False),
        ('maximum context length is 2048 tokens for "llama-secret"', False),
        ("jinja2.exceptions.TemplateError: Conversation roles must alternate", False),
    ],
)
def test_which_upstream_messages_reach_tenants(message: str, passed: bool) -> None:
    from gateway.errors import UpstreamRejected
    from gateway.upstreams.base import UpstreamReply
    from gateway.upstreams.http import reply_error

    body = orjson.dumps({"error": {"message": message, "code": "secret_code", "param": "x"}})
    error = reply_error(UpstreamReply(400, body))
    assert isinstance(error, UpstreamRejected)
    assert (error.status_code, error.code, error.param) == (400, "upstream_rejected", None)
    assert (error.message == message) is passed
    if not passed:
        assert error.message == "The model server rejected the request (400)."


def test_upstream_credentials_never_reach_tenants(
    gateway_factory: GatewayFactory, fake_engine_server: ServerThread
) -> None:
    secret = "sluis-user:s3cret-pass@"
    with_credentials = fake_engine_server.url.replace("http://", "http://" + secret)
    dead_port = free_port()
    for tenant, url in [
        ("up", with_credentials),
        ("down", f"http://{secret}127.0.0.1:{dead_port}"),
    ]:
        gateway = gateway_factory(
            upstream_url=url, file=FileConfig(models=(ModelConfig(id="fake-chat"),))
        )
        key = gateway.create_tenant(tenant)
        answers = [
            post(gateway, key, CHAT),
            post(gateway, key, {**CHAT, "stream": True}),
            post(gateway, key, {**CHAT, "max_tokens": 100_000}),  # an upstream 400
            post(gateway, key, {**CHAT, "max_tokens": 100_000, "stream": True}),
            httpx.get(gateway.url + "/v1/models", headers={"authorization": f"Bearer {key}"}),
            httpx.get(gateway.url + "/readyz"),
            httpx.get(gateway.url + "/healthz"),
        ]
        for answer in answers:
            for leak in ("s3cret-pass", "sluis-user", str(dead_port), fake_engine_server.url):
                assert leak not in answer.text, (answer.request.url, answer.text)
                assert all(leak not in value for value in answer.headers.values())
        gateway.stop()
    down = answers[0]
    assert_openai_error(down, 503, "upstream_unavailable")


def test_upstream_server_error_is_a_502(gateway: RunningGateway, acme: str) -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": "[[fail:500]]"}]}
    assert_openai_error(post(gateway, acme, body), 502, "upstream_error")
    [record] = gateway.records()
    assert (record["status"], record["outcome"]) == (502, "error")


def test_unknown_route_and_method(gateway: RunningGateway, acme: str) -> None:
    assert_openai_error(httpx.get(gateway.url + "/v1/nothing"), 404, "unknown_route")
    assert_openai_error(httpx.get(gateway.url + "/v1/chat/completions"), 405, "method_not_allowed")
