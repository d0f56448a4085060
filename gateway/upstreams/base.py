"""The upstream protocol: what the gateway needs from anything that runs models."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

DONE = b"[DONE]"


class Endpoint(StrEnum):
    CHAT = "chat/completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"


@dataclass(frozen=True, slots=True)
class UpstreamModel:
    """A model an upstream serves, as its `/v1/models` describes it."""

    id: str
    # The context window when the server tells it (vLLM's `max_model_len`).
    context_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    endpoint: Endpoint
    body: dict[str, Any]
    request_id: str
    # Trace propagation (`traceparent`) for the model server.
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    status: int
    body: bytes


class Upstream(Protocol):
    async def list_models(self) -> list[UpstreamModel]:
        """The models the upstream serves; raises `UpstreamUnavailable` when unreachable."""
        ...

    async def send(self, call: UpstreamCall) -> UpstreamReply:
        """A non-streaming call. Error statuses come back as replies, unreachability raises
        `UpstreamUnavailable`, a stalled server `UpstreamTimeout`."""
        ...

    def stream(self, call: UpstreamCall) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """A streaming call yielding each server-sent event's data (JSON, or `[DONE]`).

        Entering raises `UpstreamRejected`/`UpstreamFailed` for an error status and
        `UpstreamUnavailable` when unreachable; iterating raises `UpstreamFailed` when the
        stream breaks. Leaving the context early aborts the generation upstream.
        """
        ...

    async def aclose(self) -> None: ...
