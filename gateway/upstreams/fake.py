"""The fake engine in-process, behind the upstream protocol: no sockets, fully deterministic."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson

from gateway.errors import UpstreamFailed
from gateway.fake_engine import FakeEngine, FakeEngineError, StreamBroken
from gateway.upstreams.base import UpstreamCall, UpstreamModel, UpstreamReply
from gateway.upstreams.http import reply_error


class FakeUpstream:
    def __init__(self, engine: FakeEngine | None = None) -> None:
        self.engine = engine or FakeEngine()

    async def list_models(self) -> list[UpstreamModel]:
        return [
            UpstreamModel(name, self.engine.config.max_context) for name in self.engine.models()
        ]

    async def send(self, call: UpstreamCall) -> UpstreamReply:
        try:
            plan = self.engine.plan(call.endpoint, call.body)
            return UpstreamReply(200, orjson.dumps(await self.engine.complete(plan)))
        except FakeEngineError as exc:
            return UpstreamReply(exc.status, orjson.dumps(exc.body))

    @asynccontextmanager
    async def stream(self, call: UpstreamCall) -> AsyncIterator[AsyncIterator[bytes]]:
        try:
            plan = self.engine.plan(call.endpoint, call.body)
        except FakeEngineError as exc:
            raise reply_error(UpstreamReply(exc.status, orjson.dumps(exc.body))) from exc
        events = self.engine.stream(plan)
        try:
            yield _translate_breaks(events)
        finally:
            await events.aclose()

    async def aclose(self) -> None:
        return None


async def _translate_breaks(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield event
    except StreamBroken as exc:
        raise UpstreamFailed("The model server's stream broke off.") from exc
