"""An OpenAI-compatible server over HTTP (vLLM, SGLang, TGI, another Sluis, ...).

One aiohttp session per process: pooled keep-alive connections (aiohttp sets TCP_NODELAY on
every connection), no client per request. Keep-alive is shorter than the servers' own (uvicorn
closes idle connections after 5 s) so that a pooled connection is never reused just as the
server closes it. Answers are asked for uncompressed (`Accept-Encoding: identity`): usage is read
from them and they are relayed as they come; one compressed anyway (a proxy that ignores the
header) is decompressed.

Nothing about the upstream reaches a tenant unless the catalog owns it. The configured URL (it may
carry `user:pass@`) appears in no error. An upstream 4xx keeps its status, but its message is
passed on only when it is one the tenant needs to fix its request, told in words and numbers: a
message about the model's maximum context length (vLLM's), made of letters, digits, whitespace and
`_ . , : ; ' ( ) < > = + -` only, at most 400 characters. That leaves out what could carry a
path, a URL, an org/model name or a quoted identifier (slashes, backslashes, `@`, quotes,
backticks, brackets). Any other message becomes a generic one, and the code is always
`upstream_rejected` (the upstream's own code and param are dropped).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import aiohttp
import orjson

from gateway.errors import (
    SluisError,
    UpstreamFailed,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.settings import UpstreamConfig
from gateway.upstreams.base import UpstreamCall, UpstreamModel, UpstreamReply
from gateway.upstreams.sse import iter_sse_data

KEEPALIVE_S = 4.0
_PASSED_MESSAGE = re.compile(r"[\w\s.,:;'()<>=+-]{1,400}", re.ASCII)


class HTTPUpstream:
    def __init__(self, config: UpstreamConfig) -> None:
        if not config.url:
            raise ValueError("an http upstream needs a url")
        base = config.url.rstrip("/")
        self._base = base if base.endswith("/v1") else base + "/v1"
        self._config = config
        self._headers = {"content-type": "application/json", "accept-encoding": "identity"}
        if config.api_key is not None:
            self._headers["authorization"] = f"Bearer {config.api_key.get_secret_value()}"
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return self._base

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running event loop that will use it.
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._config.max_connections,
                keepalive_timeout=KEEPALIVE_S,
                ttl_dns_cache=300,
            )
            timeout = aiohttp.ClientTimeout(
                total=None,
                sock_connect=self._config.connect_timeout_s,
                sock_read=self._config.read_timeout_s,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=timeout,
                headers=self._headers,
                auto_decompress=True,  # only ever at work on an answer that ignored identity
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def list_models(self) -> list[UpstreamModel]:
        with self._transport_errors():
            async with self._client().get(self._base + "/models") as response:
                if response.status != 200:
                    raise UpstreamUnavailable(
                        f"The model server answered {response.status} to /models."
                    )
                payload = orjson.loads(await response.read())
        return [
            UpstreamModel(entry["id"], _context_tokens(entry.get("max_model_len")))
            for entry in payload.get("data", [])
        ]

    async def send(self, call: UpstreamCall) -> UpstreamReply:
        with self._transport_errors():
            async with self._client().post(
                f"{self._base}/{call.endpoint}",
                data=orjson.dumps(call.body),
                headers={"x-request-id": call.request_id, **call.headers},
            ) as response:
                return UpstreamReply(status=response.status, body=await response.read())

    @asynccontextmanager
    async def stream(self, call: UpstreamCall) -> AsyncIterator[AsyncIterator[bytes]]:
        with self._transport_errors():
            response = await self._client().post(
                f"{self._base}/{call.endpoint}",
                data=orjson.dumps(call.body),
                headers={
                    "x-request-id": call.request_id,
                    "accept": "text/event-stream",
                    **call.headers,
                },
            )
        try:
            if response.status != 200:
                with self._transport_errors():
                    body = await response.read()
                raise reply_error(UpstreamReply(response.status, body))
            yield _events(response)
        finally:
            if response.content.at_eof():
                response.release()
            else:
                # Closing the connection mid-stream is how an OpenAI-compatible server learns
                # to abort the generation.
                response.close()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    @contextmanager
    def _transport_errors(self) -> Iterator[None]:
        try:
            yield
        except SluisError:
            raise
        except aiohttp.ClientConnectorError as exc:
            raise _unavailable() from exc
        except (aiohttp.ConnectionTimeoutError, aiohttp.SocketTimeoutError) as exc:
            if isinstance(exc, aiohttp.ConnectionTimeoutError):
                raise _unavailable() from exc
            raise UpstreamTimeout("The model server did not answer in time.") from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamFailed("The model server closed the connection.") from exc


async def _events(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    try:
        async for data in iter_sse_data(response.content.iter_any()):
            yield data
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise UpstreamFailed("The model server's stream broke off.") from exc


def reply_error(reply: UpstreamReply) -> UpstreamRejected | UpstreamFailed | UpstreamUnavailable:
    """The error to give the client for an upstream error reply."""
    if reply.status in (429, 503):
        return UpstreamUnavailable(
            "The model server is at capacity; try again shortly.", code="upstream_overloaded"
        )
    if 400 <= reply.status < 500 and reply.status not in (401, 403, 407):
        # The client's request was at fault (e.g. longer than the model's context).
        return UpstreamRejected(reply.status, _tenant_message(reply))
    return UpstreamFailed(f"The model server failed ({reply.status}).")


def _tenant_message(reply: UpstreamReply) -> str:
    """The upstream's message when the module docstring's rule lets it through, else ours."""
    message, _ = _error_details(reply.body)
    if (
        message is not None
        and "maximum context length" in message
        and _PASSED_MESSAGE.fullmatch(message)
    ):
        return message
    return f"The model server rejected the request ({reply.status})."


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


def _unavailable() -> UpstreamUnavailable:
    # Never the URL: it may hold credentials, and tenants see this message.
    return UpstreamUnavailable("The model server cannot be reached.")


def _context_tokens(value: object) -> int | None:
    return value if isinstance(value, int) and value > 1 else None
