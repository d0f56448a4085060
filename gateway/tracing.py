"""OpenTelemetry tracing: a server span per tenant request, child spans for auth, admission and
the model call (GenAI semantic conventions), `traceparent` passed on to the model server.

Exported over OTLP/HTTP when `SLUIS_OTLP_ENDPOINT` is set; otherwise a no-op tracer (no cost,
nothing recorded). Spans never carry prompt or completion text.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import NoOpTracerProvider, SpanKind, Tracer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TRACER_NAME = "sluis.gateway"


def build_tracer_provider(otlp_endpoint: str | None) -> trace.TracerProvider:
    if not otlp_endpoint:
        return NoOpTracerProvider()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": "sluis-gateway"}))
    exporter = OTLPSpanExporter(endpoint=traces_url(otlp_endpoint))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def traces_url(otlp_endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a collector given as its base URL (or already as it)."""
    endpoint = otlp_endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else f"{endpoint}/v1/traces"


def propagation_headers() -> dict[str, str]:
    """`traceparent` (and `tracestate`) of the current span, for the model server."""
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier


class TracingMiddleware:
    """Opens the server span of each `/v1/` request, continuing the client's `traceparent`."""

    def __init__(self, app: ASGIApp, *, tracer: Tracer) -> None:
        self.app = app
        self._tracer = tracer
        self._recording = not isinstance(tracer, trace.NoOpTracer)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        carrier = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in scope["headers"]
            if k in (b"traceparent", b"tracestate")
        }
        if not carrier and not self._recording:
            # Tracing off and no trace to continue: no span, not even a no-op one.
            await self.app(scope, receive, send)
            return
        name = f"{scope['method']} {scope['path']}"
        with self._tracer.start_as_current_span(
            name,
            context=extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": scope["method"], "url.path": scope["path"]},
        ) as span:

            async def send_with_status(message: Message) -> None:
                if message["type"] == "http.response.start":
                    span.set_attribute("http.response.status_code", message["status"])
                    if message["status"] >= 500:
                        span.set_status(trace.StatusCode.ERROR)
                await send(message)

            await self.app(scope, receive, send_with_status)
