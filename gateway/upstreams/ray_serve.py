"""The catalog's Ray Serve model deployments behind the upstream protocol.

Each model is one deployment (`deployments/model.py`) reached through a DeploymentHandle: no
HTTP hop, no JSON re-encoding. A replica answers in vLLM's own wire format (the same bytes its
OpenAI server would send), so metering, stripping and error mapping are the HTTP upstream's:

- `respond(endpoint, body, headers)` -> `(status, body)` for a whole answer;
- `stream(endpoint, body, headers)` yields the status first, then server-sent-event bytes
  (several events per item when they queued up: fewer Ray messages under load).

Leaving a stream early cancels the replica's generator, which aborts the generation in vLLM.
A replica dying mid-stream surfaces as `UpstreamFailed`: the client's stream ends without
`[DONE]`, never with a made-up ending.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from gateway.errors import UpstreamFailed, UpstreamUnavailable
from gateway.upstreams.base import UpstreamCall, UpstreamModel, UpstreamReply
from gateway.upstreams.http import reply_error
from gateway.upstreams.sse import iter_sse_data

log = logging.getLogger("sluis.upstream.ray")


class RayServeUpstream:
    def __init__(self, handles: Mapping[str, Any]) -> None:
        """`handles`: the upstream model name -> its deployment's DeploymentHandle."""
        self._handles = dict(handles)
        self._streaming = {name: h.options(stream=True) for name, h in self._handles.items()}

    async def list_models(self) -> list[UpstreamModel]:
        return [UpstreamModel(name) for name in self._handles]

    async def send(self, call: UpstreamCall) -> UpstreamReply:
        handle = self._handles.get(call.body.get("model", ""))
        if handle is None:
            return _unknown_model(call)
        try:
            status, body = await handle.respond.remote(
                call.endpoint.value, call.body, _headers(call)
            )
        except Exception as exc:  # Ray raises many error types; all mean "not answered"
            log.warning("model deployment failed request %s: %r", call.request_id, exc)
            raise UpstreamUnavailable("The model deployment could not answer.") from exc
        return UpstreamReply(status=status, body=body)

    @asynccontextmanager
    async def stream(self, call: UpstreamCall) -> AsyncIterator[AsyncIterator[bytes]]:
        handle = self._streaming.get(call.body.get("model", ""))
        if handle is None:
            raise reply_error(_unknown_model(call))
        try:
            response = handle.stream.remote(call.endpoint.value, call.body, _headers(call))
        except Exception as exc:  # e.g. the handle's router cannot reach the controller
            log.warning("model deployment refused stream %s: %r", call.request_id, exc)
            raise UpstreamUnavailable("The model deployment could not answer.") from exc
        try:
            try:
                status = await response.__anext__()
            except Exception as exc:
                log.warning("model deployment refused stream %s: %r", call.request_id, exc)
                raise UpstreamUnavailable("The model deployment could not answer.") from exc
            if status != 200:
                try:
                    rest = await _rest(response)
                except Exception as exc:
                    log.warning("model deployment broke stream %s: %r", call.request_id, exc)
                    raise UpstreamFailed("The model deployment's answer broke off.") from exc
                raise reply_error(UpstreamReply(status, rest))
            yield iter_sse_data(_chunks(response, call.request_id))
        finally:
            response.cancel()  # a no-op once finished; aborts the generation otherwise

    async def aclose(self) -> None:
        return None


def _headers(call: UpstreamCall) -> dict[str, str]:
    return {"x-request-id": call.request_id, **call.headers}


def _unknown_model(call: UpstreamCall) -> UpstreamReply:
    model = call.body.get("model", "")
    body = (
        b'{"error":{"message":"No deployment serves this model.","type":"NotFoundError",'
        b'"code":404}}'
    )
    log.error("no deployment for upstream model %r", model)
    return UpstreamReply(404, body)


async def _rest(response: Any) -> bytes:
    parts = [item async for item in response]
    return b"".join(parts)


async def _chunks(response: Any, request_id: str) -> AsyncIterator[bytes]:
    try:
        async for chunk in response:
            yield chunk
    except Exception as exc:
        log.warning("model deployment stream %s broke: %r", request_id, exc)
        raise UpstreamFailed("The model deployment's stream broke off.") from exc
