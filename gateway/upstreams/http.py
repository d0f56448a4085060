"""An OpenAI-compatible server over HTTP (vLLM, SGLang, TGI, another Sluis, ...)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import orjson

from gateway.errors import (
    UpstreamFailed,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.settings import UpstreamConfig
from gateway.upstreams.base import UpstreamCall, UpstreamReply
from gateway.upstreams.sse import iter_sse_data

_NO_DELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


class HTTPUpstream:
    """One pooled client for the process: connections are kept alive and reused."""

    def __init__(
        self, config: UpstreamConfig, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        if not config.url:
            raise ValueError("an http upstream needs a url")
        self._base = config.url.rstrip("/")
        if not self._base.endswith("/v1"):
            self._base += "/v1"
        headers = {"content-type": "application/json"}
        if config.api_key is not None:
            headers["authorization"] = f"Bearer {config.api_key.get_secret_value()}"
        limits = httpx.Limits(
            max_connections=config.max_connections,
            max_keepalive_connections=config.max_connections,
            keepalive_expiry=60,
        )
        self._client = httpx.AsyncClient(
            base_url=self._base,
            headers=headers,
            timeout=httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s),
            transport=transport
            or httpx.AsyncHTTPTransport(limits=limits, socket_options=_NO_DELAY, retries=0),
        )

    @property
    def url(self) -> str:
        return self._base

    async def list_models(self) -> list[str]:
        try:
            response = await self._client.get("/models")
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise _unavailable(self._base) from exc
        if response.status_code != 200:
            raise UpstreamUnavailable(
                f"The model server answered {response.status_code} to /models."
            )
        return [entry["id"] for entry in response.json().get("data", [])]

    async def send(self, call: UpstreamCall) -> UpstreamReply:
        try:
            response = await self._client.post(
                "/" + call.endpoint,
                content=orjson.dumps(call.body),
                headers={"x-request-id": call.request_id},
            )
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout):
                raise _unavailable(self._base) from exc
            raise UpstreamTimeout("The model server did not answer in time.") from exc
        except httpx.TransportError as exc:
            raise _unavailable(self._base) from exc
        return UpstreamReply(status=response.status_code, body=response.content)

    @asynccontextmanager
    async def stream(self, call: UpstreamCall) -> AsyncIterator[AsyncIterator[bytes]]:
        request = self._client.build_request(
            "POST",
            "/" + call.endpoint,
            content=orjson.dumps(call.body),
            headers={"x-request-id": call.request_id, "accept": "text/event-stream"},
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout):
                raise _unavailable(self._base) from exc
            raise UpstreamTimeout("The model server did not answer in time.") from exc
        except httpx.TransportError as exc:
            raise _unavailable(self._base) from exc
        try:
            if response.status_code != 200:
                await response.aread()
                raise reply_error(UpstreamReply(response.status_code, response.content))
            yield _events(response)
        finally:
            # Closing the response closes its connection mid-stream, which is how an
            # OpenAI-compatible server learns to abort the generation.
            await response.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()


async def _events(response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for data in iter_sse_data(response.aiter_raw()):
            yield data
    except (httpx.TransportError, httpx.TimeoutException) as exc:
        raise UpstreamFailed("The model server's stream broke off.") from exc


def reply_error(reply: UpstreamReply) -> UpstreamRejected | UpstreamFailed:
    """The error to give the client for an upstream error reply."""
    message, code = _error_details(reply.body)
    if 400 <= reply.status < 500 and reply.status not in (401, 403, 407, 429):
        # The client's request was at fault (e.g. longer than the model's context).
        return UpstreamRejected(
            reply.status, message or "The model server rejected the request.", code=code
        )
    return UpstreamFailed(f"The model server failed ({reply.status}).")


def _error_details(body: bytes) -> tuple[str | None, str | None]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        message = error.get("message")
        code = error.get("code")
        return (
            message if isinstance(message, str) else None,
            code if isinstance(code, str) else None,
        )
    if isinstance(payload, dict) and isinstance(payload.get("message"), str):
        return payload["message"], None
    return None, None


def _unavailable(url: str) -> UpstreamUnavailable:
    return UpstreamUnavailable(f"The model server at {url} cannot be reached.")
