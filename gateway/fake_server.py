"""The fake engine as an OpenAI-compatible HTTP server (`sluis fake-engine`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway.fake_engine import FakeEngine, FakeEngineError
from gateway.upstreams.base import Endpoint
from gateway.upstreams.sse import encode_event


def create_fake_server(engine: FakeEngine | None = None) -> Starlette:
    engine = engine or FakeEngine()
    traceparents: list[str] = []

    async def models(_: Request) -> Response:
        context = engine.config.max_context
        data = [
            {"id": name, "object": "model", "owned_by": "fake", "max_model_len": context}
            for name in engine.models()
        ]
        return _json({"object": "list", "data": data})

    def handler(endpoint: Endpoint):  # type: ignore[no-untyped-def]
        async def handle(request: Request) -> Response:
            traceparent = request.headers.get("traceparent")
            if traceparent:  # kept so tests can see the trace reach the model server
                traceparents.append(traceparent)
            body = orjson.loads(await request.body())
            try:
                plan = engine.plan(endpoint, body)
                if body.get("stream"):
                    return StreamingResponse(
                        _sse(engine.stream(plan)), media_type="text/event-stream"
                    )
                return _json(await engine.complete(plan))
            except FakeEngineError as exc:
                return _json(exc.body, exc.status)

        return handle

    routes = [Route("/v1/models", models)] + [
        Route(f"/v1/{endpoint.value}", handler(endpoint), methods=["POST"]) for endpoint in Endpoint
    ]
    app = Starlette(routes=routes)
    app.state.engine = engine
    app.state.traceparents = traceparents
    return app


async def _sse(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    # A `StreamBroken` raised out of the response body makes the server drop the connection
    # mid-stream, as a crashed model replica would.
    async for event in events:
        yield encode_event(event)


def _json(payload: object, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")
