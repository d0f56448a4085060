"""Relaying a server-sent-event stream from the upstream to the client, counting as it goes.

The gateway always asks the upstream for usage (`include_usage`, and `continuous_usage_stats`
where the upstream supports it) and removes what the client did not ask for. The count that is
billed is what the client was actually sent: when the client leaves mid-stream, the tokens of the
chunks it received. A stream that breaks or reports an error ends with an error event and no
`[DONE]`, so no client can take it for a complete answer.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import anyio
import orjson
from starlette.types import Receive, Scope, Send

from gateway.clock import Clock
from gateway.errors import SluisError, UpstreamFailed
from gateway.upstreams.base import DONE
from gateway.upstreams.sse import encode_event
from gateway.usage import Outcome

log = logging.getLogger("sluis.streaming")

_DONE_EVENT = encode_event(DONE)


@dataclass(frozen=True, slots=True)
class StreamResult:
    prompt_tokens: int
    completion_tokens: int
    usage_exact: bool
    outcome: Outcome
    status: int
    first_token_at: float | None


class StreamMeter:
    """Rewrites each upstream event for the client and keeps the usage delivered so far."""

    def __init__(
        self, *, wants_usage: bool, wants_continuous_usage: bool, prompt_floor: int = 0
    ) -> None:
        self._wants_usage = wants_usage
        self._wants_continuous = wants_continuous_usage
        # The engine took the stream on: until it reports usage, the prompt's estimate counts
        # (a stream cut during prefill, or an upstream without continuous usage, still pays it).
        self._floor = prompt_floor
        self._pending: tuple[int, int, bool] = (prompt_floor, 0, False)
        self.prompt_tokens = prompt_floor
        self.completion_tokens = 0
        self.usage_exact = False
        self._chunks_with_content = 0
        self.saw_first_token = False
        self.errored = False
        self.done = False

    def rewrite(self, data: bytes) -> bytes | None:
        """The bytes to send the client for one upstream event, or None to send nothing."""
        if data == DONE:
            if self.errored:
                return None
            self.done = True
            return _DONE_EVENT
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.errored = True
            return encode_event(_error_json("The model server sent an unreadable event."))
        if not isinstance(chunk, dict):
            return encode_event(data)
        if "error" in chunk:
            self.errored = True
            return encode_event(data)
        usage = chunk.get("usage")
        choices = chunk.get("choices") or []
        has_content = bool(choices) and any(_has_content(choice) for choice in choices)
        if has_content:
            self._chunks_with_content += 1
        if isinstance(usage, dict) and _counts(usage):
            self._pending = (usage.get("prompt_tokens") or 0, usage["completion_tokens"], True)
        elif not self._pending[2]:
            self._pending = (self._floor, self._chunks_with_content, False)
        if not choices and usage is not None and "choices" in chunk:
            # The final usage-only chunk: the client gets it only if it asked.
            self.commit()
            return encode_event(data) if self._wants_usage else None
        if "usage" in chunk and not self._wants_continuous:
            if self._wants_usage:
                chunk["usage"] = None
            else:
                del chunk["usage"]
            return encode_event(orjson.dumps(chunk))
        return encode_event(data)

    def commit(self) -> None:
        """The last rewritten event reached the client: its usage now counts."""
        self.prompt_tokens, self.completion_tokens, self.usage_exact = self._pending

    def note_first_token(self) -> bool:
        if self.saw_first_token or self._chunks_with_content == 0:
            return False
        self.saw_first_token = True
        return True


class StreamRelay:
    """An ASGI response that relays an entered upstream stream and reports how it ended."""

    def __init__(
        self,
        *,
        events: AsyncIterator[bytes],
        resources: AsyncExitStack,
        meter: StreamMeter,
        headers: dict[str, str],
        clock: Clock,
        on_finish: Callable[[StreamResult], Awaitable[None]],
        idle_timeout_s: float = 60.0,
    ) -> None:
        self._idle_timeout_s = idle_timeout_s
        self._events = events
        self._resources = resources
        self._meter = meter
        self._headers = headers
        self._clock = clock
        self._on_finish = on_finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        meter = self._meter
        first_token_at: float | None = None
        outcome: Outcome = "ok"
        status = 200
        disconnected = False
        try:
            raw_headers = [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
            ]
            raw_headers += [(k.encode(), v.encode()) for k, v in self._headers.items()]
            await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
            client_gone = anyio.Event()
            async with anyio.create_task_group() as group:
                group.start_soon(_watch_disconnect, receive, group.cancel_scope, client_gone)
                try:
                    async for data in self._events:
                        out = meter.rewrite(data)
                        if out is None:
                            continue
                        # A client that stops reading blocks this send once the buffers are
                        # full; past the limit it is let go (its slot and the engine freed).
                        with anyio.move_on_after(self._idle_timeout_s) as reading:
                            await send(
                                {"type": "http.response.body", "body": out, "more_body": True}
                            )
                        if reading.cancelled_caught:
                            log.info(
                                "stream ended: its client read nothing for %.0f s",
                                self._idle_timeout_s,
                            )
                            disconnected = True
                            break
                        meter.commit()
                        if first_token_at is None and meter.note_first_token():
                            first_token_at = self._clock.monotonic()
                    if not meter.done and not meter.errored and not disconnected:
                        raise UpstreamFailed("The model server's stream ended before [DONE].")
                except SluisError as exc:
                    meter.errored = True
                    status = exc.status_code
                    await send(
                        {
                            "type": "http.response.body",
                            "more_body": True,
                            "body": encode_event(_error_json(exc.message, exc.code)),
                        }
                    )
                except OSError:
                    disconnected = True
                group.cancel_scope.cancel()
            disconnected = disconnected or client_gone.is_set()
            if not disconnected:
                try:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except OSError:
                    disconnected = True
        finally:
            if meter.errored:
                outcome, status = "error", status if status != 200 else 502
            elif disconnected or not meter.done:
                outcome, status = "cancelled", 499
            result = StreamResult(
                prompt_tokens=meter.prompt_tokens,
                completion_tokens=meter.completion_tokens,
                usage_exact=meter.usage_exact,
                outcome=outcome,
                status=status,
                first_token_at=first_token_at,
            )
            with anyio.CancelScope(shield=True):
                await self._resources.aclose()
                await self._on_finish(result)


async def _watch_disconnect(
    receive: Receive, scope: anyio.CancelScope, client_gone: anyio.Event
) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            client_gone.set()
            scope.cancel()
            return


def _counts(usage: dict[str, Any]) -> bool:
    """Whether a usage object carries counts the gateway can bill (malformed ones do not)."""
    return all(
        isinstance(value, int) and not isinstance(value, bool) and value >= 0
        for value in (usage.get("prompt_tokens") or 0, usage.get("completion_tokens"))
    )


def _has_content(choice: Any) -> bool:
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return bool(
            delta.get("content") or delta.get("tool_calls") or delta.get("reasoning_content")
        )
    return bool(choice.get("text"))


def _error_json(message: str, code: str | None = "upstream_error") -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": "upstream_error", "code": code, "param": None}}
    )
