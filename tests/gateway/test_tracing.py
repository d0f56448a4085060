"""The span tree of one request, read back with the in-memory exporter."""

from __future__ import annotations

import time

import httpx
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.conftest import GatewayFactory
from tests.servers import ServerThread

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SECRET_PROMPT = "zeer geheime vraag over de sluis"


def test_one_request_one_span_tree(
    gateway_factory: GatewayFactory, fake_engine_server: ServerThread
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    gateway = gateway_factory(tracer_provider=provider)
    key = gateway.create_tenant("acme")
    seen_before = len(fake_engine_server.app.state.traceparents)  # type: ignore[attr-defined]
    for stream in (False, True):
        exporter.clear()
        response = httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json={
                "model": "fake-chat",
                "max_tokens": 3,
                "stream": stream,
                "messages": [{"role": "user", "content": SECRET_PROMPT}],
            },
            headers={
                "authorization": f"Bearer {key}",
                "traceparent": f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01",
            },
        )
        assert response.status_code == 200
        spans = _finished(exporter, "POST /v1/chat/completions", "chat fake-chat")
        server = spans["POST /v1/chat/completions"]
        model = spans["chat fake-chat"]
        assert server.kind is SpanKind.SERVER and model.kind is SpanKind.CLIENT
        assert format(server.context.trace_id, "032x") == CLIENT_TRACE  # the client's trace
        for child in ("sluis.auth", "sluis.admission", "chat fake-chat"):
            assert spans[child].parent.span_id == server.context.span_id
        assert server.attributes["sluis.tenant"] == "acme"
        assert server.attributes["http.response.status_code"] == 200
        assert model.attributes["gen_ai.operation.name"] == "chat"
        assert model.attributes["gen_ai.request.model"] == "fake-chat"
        assert model.attributes["gen_ai.request.max_tokens"] == 3
        assert model.attributes["gen_ai.usage.input_tokens"] == 6
        assert model.attributes["gen_ai.usage.output_tokens"] == 3
        assert model.attributes["sluis.stream"] is stream
        if stream:  # the streaming phase, under the model call
            relaying = spans["sluis.stream"]
            assert relaying.parent.span_id == model.context.span_id
            assert relaying.attributes["sluis.outcome"] == "ok"
            assert relaying.attributes["gen_ai.usage.output_tokens"] == 3
        else:
            assert "sluis.stream" not in spans
        # The model server got the trace, with the model call as its parent.
        traceparent = fake_engine_server.app.state.traceparents[-1]  # type: ignore[attr-defined]
        _, trace_id, parent_id, _ = traceparent.split("-")
        assert trace_id == CLIENT_TRACE
        assert parent_id == format(model.context.span_id, "016x")
        # No prompt text anywhere in any span.
        for span in spans.values():
            for value in (span.attributes or {}).values():
                assert "geheime" not in str(value)
    assert len(fake_engine_server.app.state.traceparents) == seen_before + 2  # type: ignore[attr-defined]


def _finished(exporter: InMemorySpanExporter, *names: str) -> dict[str, ReadableSpan]:
    """The finished spans by name, once those named have ended: the server span ends just
    after the answer's last byte is sent, so a busy machine may show it a moment later."""
    deadline = time.monotonic() + 10
    while True:
        spans = {span.name: span for span in exporter.get_finished_spans()}
        if all(name in spans for name in names) or time.monotonic() > deadline:
            return spans
        time.sleep(0.01)


def test_no_endpoint_no_tracing(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory()
    from opentelemetry.trace import NoOpTracer

    assert isinstance(gateway.state.tracer, NoOpTracer)
