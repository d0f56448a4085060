"""The deterministic fake engine as a model deployment: the Ray Serve path without vLLM.

Same wire format as `deployments/model.py` (status first, then server-sent-event bytes), so
placement, scaling and the Ray upstream can be exercised in seconds. The catalog selects it
with `backend: fake`; the default catalog serves real models with vLLM.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from gateway.fake_engine import FakeEngine, FakeEngineConfig, FakeEngineError
from gateway.upstreams.base import Endpoint
from gateway.upstreams.sse import encode_event


class FakeModel:
    def __init__(self, served_name: str, task: str) -> None:
        embed = (served_name,) if task == "embed" else ()
        self._engine = FakeEngine(FakeEngineConfig(models=(served_name,), embedding_models=embed))

    async def respond(
        self, endpoint: str, body: dict[str, Any], headers: dict[str, str]
    ) -> tuple[int, bytes]:
        try:
            plan = self._engine.plan(Endpoint(endpoint), body)
            return 200, orjson.dumps(await self._engine.complete(plan))
        except FakeEngineError as exc:
            return exc.status, orjson.dumps(exc.body)

    async def stream(
        self, endpoint: str, body: dict[str, Any], headers: dict[str, str]
    ) -> AsyncIterator[int | bytes]:
        try:
            plan = self._engine.plan(Endpoint(endpoint), body)
        except FakeEngineError as exc:
            yield exc.status
            yield orjson.dumps(exc.body)
            return
        yield 200
        async for event in self._engine.stream(plan):
            yield encode_event(event)

    def counters(self) -> dict[str, int]:
        """Requests generating now and generations aborted (for tests and probes)."""
        return {"running": self._engine.running, "aborted": self._engine.aborted}

    def node_id(self) -> str:
        import ray

        return str(ray.get_runtime_context().get_node_id())
