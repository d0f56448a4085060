"""The tenant API: authenticate, validate, admit, forward, meter."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio
import orjson
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from billing.periods import period_of
from gateway.admission import AdmissionRequest, Admitted
from gateway.auth import Principal
from gateway.body import parse_json_object, read_limited_body
from gateway.catalog import Model
from gateway.errors import PermissionDenied, SluisError, UpstreamRejected, UpstreamUnavailable
from gateway.fields import check_min_tokens, govern_fields
from gateway.generation import Generation, plan_generation
from gateway.payloads import validate_payload
from gateway.state import GatewayState, gateway_state, request_id
from gateway.streaming import StreamMeter, StreamRelay, StreamResult
from gateway.tracing import propagation_headers
from gateway.upstreams.base import Endpoint, UpstreamCall
from gateway.upstreams.http import reply_error
from gateway.usage import Outcome, UsageRecord

log = logging.getLogger("sluis.proxy")


@dataclass(frozen=True, slots=True)
class _Context:
    state: GatewayState
    principal: Principal
    model: Model
    endpoint: Endpoint
    request_id: str
    started: float
    admitted: Admitted
    generation: Generation


async def list_models(request: Request) -> Response:
    state = gateway_state(request)
    principal = await state.authenticator.authenticate(request.headers.get("authorization"))
    data = [
        {"id": model.id, "object": "model", "created": 0, "owned_by": model.owned_by}
        for model in state.catalog
        if principal.tenant.allows(model.id)
    ]
    return _json({"object": "list", "data": data})


def _endpoint_handler(endpoint: Endpoint):  # type: ignore[no-untyped-def]
    async def handle(request: Request) -> Response | StreamRelay:
        return await _forward(request, endpoint)

    handle.__name__ = f"create_{endpoint.name.lower()}"
    return handle


async def _forward(request: Request, endpoint: Endpoint) -> Response | StreamRelay:
    state = gateway_state(request)
    started = state.clock.monotonic()
    with state.tracer.start_as_current_span("sluis.auth"):
        principal = await state.authenticator.authenticate(request.headers.get("authorization"))
    trace.get_current_span().set_attribute("sluis.tenant", principal.tenant.name)
    body = parse_json_object(await read_limited_body(request, state.settings.max_body_bytes))
    payload = validate_payload(endpoint, body)
    model = state.catalog.resolve(payload.model)
    if not principal.tenant.allows(model.id):
        raise PermissionDenied(
            f"The tenant '{principal.tenant.name}' may not use the model '{model.id}'.",
            code="model_not_allowed",
            param="model",
        )
    govern_fields(endpoint, body, model)
    generation = plan_generation(endpoint, body, model)
    check_min_tokens(body)
    rid = request_id(request)
    with state.tracer.start_as_current_span("sluis.admission"):
        admitted = await state.admission.admit(
            AdmissionRequest(
                principal=principal,
                model=model,
                request_id=rid,
                endpoint=endpoint,
                generation=generation,
            )
        )
    ctx = _Context(state, principal, model, endpoint, rid, started, admitted, generation)
    body["model"] = model.upstream_model
    if payload.stream:
        options = payload.stream_options
        wants_usage = bool(options and options.include_usage)
        wants_continuous = bool(options and options.continuous_usage_stats)
        stream_options: dict[str, Any] = dict(body.get("stream_options") or {})
        stream_options["include_usage"] = True
        if state.upstream_config.continuous_usage:
            stream_options["continuous_usage_stats"] = True
        body["stream_options"] = stream_options
        meter = StreamMeter(
            wants_usage=wants_usage,
            wants_continuous_usage=wants_continuous,
            prompt_floor=generation.prompt_tokens,
        )
        return await _stream(ctx, body, meter)
    return await _complete(ctx, body)


async def _complete(ctx: _Context, body: dict[str, Any]) -> Response:
    state = ctx.state
    _enter(ctx)
    span = _model_span(ctx, body, streamed=False)
    ending = _Ending(ctx)
    try:
        state.metrics.gateway_overhead.observe(state.clock.monotonic() - ctx.started)
        with trace.use_span(span, end_on_exit=False):
            call = UpstreamCall(ctx.endpoint, body, ctx.request_id, propagation_headers())
        with _queued(ctx):
            ending.sent()
            reply = await state.upstream.send(call)
        if reply.status != 200:
            raise reply_error(reply)
        ending.answered(*_usage_of(reply.body), ttft=state.clock.monotonic())
    except BaseException as exc:
        ending.failed(exc)
        span.set_status(trace.StatusCode.ERROR, ending.code)
        raise
    finally:
        _end_model_span(span, ending.prompt, ending.completion)
        try:
            await ending.close()
        finally:
            _leave(ctx)
    return Response(reply.body, media_type="application/json", headers=ctx.admitted.headers)


async def _stream(ctx: _Context, body: dict[str, Any], meter: StreamMeter) -> StreamRelay:
    state = ctx.state
    resources = AsyncExitStack()
    state.metrics.gateway_overhead.observe(state.clock.monotonic() - ctx.started)
    span = _model_span(ctx, body, streamed=True)
    with trace.use_span(span, end_on_exit=False):
        call = UpstreamCall(ctx.endpoint, body, ctx.request_id, propagation_headers())
    ending = _Ending(ctx)
    try:
        with _queued(ctx):
            ending.sent()
            events = await resources.enter_async_context(state.upstream.stream(call))
    except BaseException as exc:
        ending.failed(exc)
        span.set_status(trace.StatusCode.ERROR, ending.code)
        _end_model_span(span, ending.prompt, ending.completion)
        with anyio.CancelScope(shield=True):
            await resources.aclose()
            await ending.close()
        raise
    _enter(ctx)
    # The streaming phase: from the model's first answer to the client's last byte.
    relaying = state.tracer.start_span("sluis.stream", context=trace.set_span_in_context(span))

    async def finish(result: StreamResult) -> None:
        try:
            _meter(
                ctx,
                result.prompt_tokens,
                result.completion_tokens,
                exact=result.usage_exact,
                status=result.status,
                outcome=result.outcome,
                ttft=result.first_token_at,
                streamed=True,
            )
            await _settle(ctx, result.prompt_tokens, result.completion_tokens)
        finally:
            if result.outcome == "error":
                relaying.set_status(trace.StatusCode.ERROR, "stream broke off")
                span.set_status(trace.StatusCode.ERROR, "stream broke off")
            relaying.set_attribute("sluis.outcome", result.outcome)
            relaying.set_attribute("gen_ai.usage.output_tokens", result.completion_tokens)
            relaying.end()
            span.set_attribute("sluis.outcome", result.outcome)
            _end_model_span(span, result.prompt_tokens, result.completion_tokens)
            _leave(ctx)

    return StreamRelay(
        events=events,
        resources=resources,
        meter=meter,
        headers=ctx.admitted.headers,
        clock=state.clock,
        on_finish=finish,
        idle_timeout_s=state.settings.stream_idle_timeout_s,
    )


class _Ending:
    """How a request that was admitted ended: metered and settled once, on every path.

    Billing policy: a request the engine took on is billed at least its prompt (the engine's
    count, else the gateway's upper-bound estimate), also when it failed or timed out while
    generating, or the client left; one the engine refused (4xx) or never received (unreachable,
    an error in the gateway before sending) costs nothing but is on record as an error.
    """

    def __init__(self, ctx: _Context) -> None:
        self._ctx = ctx
        self._reached = False
        self._closed = False
        self.prompt = self.completion = 0
        self.exact = True
        self.status = 500
        self.outcome: Outcome = "error"
        self.code = "internal_error"
        self.ttft: float | None = None

    def sent(self) -> None:
        self._reached = True

    def answered(self, prompt: int, completion: int, exact: bool, *, ttft: float) -> None:
        if not exact:  # no readable usage in a whole answer: at least the prompt
            prompt = max(prompt, self._ctx.generation.prompt_tokens)
        self.prompt, self.completion, self.exact = prompt, completion, exact
        self.status, self.outcome, self.ttft = 200, "ok", ttft

    def failed(self, exc: BaseException) -> None:
        worked = self._reached
        if isinstance(exc, SluisError):
            self.status, self.code = exc.status_code, exc.code
            worked = worked and not isinstance(exc, UpstreamRejected | UpstreamUnavailable)
            self.outcome = "error"
        elif isinstance(exc, asyncio.CancelledError):
            self.status, self.code, self.outcome = 499, "client_closed_request", "cancelled"
        else:
            log.exception("request %s failed in the gateway", self._ctx.request_id)
            worked = False  # our own failure: the engine's work, if any, is not billed
        if worked:
            self.prompt, self.exact = self._ctx.generation.prompt_tokens, False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _meter(
            self._ctx,
            self.prompt,
            self.completion,
            exact=self.exact,
            status=self.status,
            outcome=self.outcome,
            ttft=self.ttft,
        )
        # Never suspends (the settle is handed to a task), so a cancelled request cannot be
        # interrupted here and needs no shield.
        await _settle(self._ctx, self.prompt, self.completion)


_OPERATIONS = {
    Endpoint.CHAT: "chat",
    Endpoint.COMPLETIONS: "text_completion",
    Endpoint.EMBEDDINGS: "embeddings",
}


def _model_span(ctx: _Context, body: dict[str, Any], *, streamed: bool) -> Span:
    """The call to the model, per the GenAI semantic conventions (counts only, never text)."""
    operation = _OPERATIONS[ctx.endpoint]
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.request.model": ctx.model.id,
        "sluis.upstream.model": ctx.model.upstream_model,
        "sluis.tenant": ctx.principal.tenant.name,
        "sluis.request_id": ctx.request_id,
        "sluis.stream": streamed,
    }
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(max_tokens, int):
        attributes["gen_ai.request.max_tokens"] = max_tokens
    return ctx.state.tracer.start_span(
        f"{operation} {ctx.model.id}", kind=SpanKind.CLIENT, attributes=attributes
    )


def _end_model_span(span: Span, prompt: int, completion: int) -> None:
    span.set_attribute("gen_ai.usage.input_tokens", prompt)
    span.set_attribute("gen_ai.usage.output_tokens", completion)
    span.end()


@contextmanager
def _queued(ctx: _Context) -> Iterator[None]:
    """Sent to the model, no answer yet: what `sluis_queue_depth` counts."""
    gauge = ctx.state.metrics.queue_depth.labels(ctx.model.id)
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


def _enter(ctx: _Context) -> None:
    ctx.state.inflight.enter()
    ctx.state.metrics.inflight.labels(ctx.principal.tenant.name, ctx.model.id).inc()


def _leave(ctx: _Context) -> None:
    ctx.state.inflight.leave()
    ctx.state.metrics.inflight.labels(ctx.principal.tenant.name, ctx.model.id).dec()


def _meter(
    ctx: _Context,
    prompt: int,
    completion: int,
    *,
    exact: bool,
    status: int,
    outcome: Outcome,
    ttft: float | None,
    streamed: bool = False,
) -> None:
    clock = ctx.state.clock
    now = clock.now()
    duration = clock.monotonic() - ctx.started
    cost = (
        ctx.state.prices.micro_eur(ctx.model.id, prompt, completion, now)
        if (prompt or completion)
        else 0
    )
    _observe(ctx, prompt, completion, status, duration, ttft if streamed else None, cost, now)
    ctx.state.meter.record(
        UsageRecord(
            request_id=ctx.request_id,
            tenant_id=ctx.principal.tenant.id,
            key_id=ctx.principal.key_id,
            model=ctx.model.id,
            endpoint=ctx.endpoint.value,
            prompt_tokens=prompt,
            completion_tokens=completion,
            status=status,
            outcome=outcome,
            usage_exact=exact,
            ttft_ms=None if ttft is None else round((ttft - ctx.started) * 1000, 3),
            duration_ms=round(duration * 1000, 3),
            created_at=now,
            gateway_id=ctx.state.gateway_id,
            cost_micro_eur=cost,
        )
    )


def _observe(
    ctx: _Context,
    prompt: int,
    completion: int,
    status: int,
    duration: float,
    ttft: float | None,
    cost: int,
    now: datetime,
) -> None:
    metrics, tenant, model = ctx.state.metrics, ctx.principal.tenant.name, ctx.model.id
    metrics.count(
        tenant,
        model,
        status,
        period=period_of(now),
        requests=1,
        prompt=prompt,
        completion=completion,
        cost_micro_eur=cost,
    )
    metrics.request_duration.labels(model).observe(duration)
    if ttft is not None:  # streams only: a whole answer has no first token to time
        first = ttft - ctx.started
        metrics.time_to_first_token.labels(model).observe(first)
        if completion > 1:
            metrics.time_per_output_token.labels(model).observe(
                (duration - first) / (completion - 1)
            )


async def _settle(ctx: _Context, prompt: int, completion: int) -> None:
    await ctx.state.admission.settle(
        ctx.admitted, prompt_tokens=prompt, completion_tokens=completion
    )


def _usage_of(body: bytes) -> tuple[int, int, bool]:
    """The upstream's count from a whole answer; (0, 0, False) when it has none it can read."""
    try:
        usage = orjson.loads(body).get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return 0, 0, False
    if not isinstance(usage, dict):
        return 0, 0, False
    prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
    if not _count(prompt) or not _count(completion):
        return 0, 0, False
    return prompt, completion, True


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _json(payload: object, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def tenant_routes() -> list[BaseRoute]:
    routes: list[BaseRoute] = [Route("/v1/models", list_models, methods=["GET"])]
    for endpoint in Endpoint:
        routes.append(Route(f"/v1/{endpoint.value}", _endpoint_handler(endpoint), methods=["POST"]))
    return routes
