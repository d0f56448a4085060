"""`create_app(settings)`: the gateway as one Starlette application, no module globals."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from opentelemetry.trace import TracerProvider
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from billing.prices import PriceBook
from gateway.admin import admin_mount
from gateway.admission import Admission
from gateway.auth import Authenticator
from gateway.catalog import Model, ModelCatalog
from gateway.clock import Clock, SystemClock
from gateway.errors import SluisError, UpstreamUnavailable, error_body
from gateway.health import healthz, readyz
from gateway.inflight import Inflight
from gateway.metering import Meter
from gateway.metrics import Metrics
from gateway.metrics_listener import MetricsListener
from gateway.middleware import RequestIdMiddleware
from gateway.proxy import tenant_routes
from gateway.settings import ConfigError, Settings, UpstreamConfig
from gateway.state import GatewayState
from gateway.tenancy.audit import AuditLog
from gateway.tenancy.database import Database
from gateway.tenancy.instances import InstanceRegistry
from gateway.tenancy.ledger import Ledger
from gateway.tenancy.tenants import TenantStore
from gateway.tracing import TRACER_NAME, TracingMiddleware, build_tracer_provider
from gateway.upstreams.base import Upstream
from gateway.upstreams.registry import build_upstream
from quotas.admission import QuotaAdmission
from quotas.stores import build_store, store_name

log = logging.getLogger("sluis.gateway")

ADMIN_TOKEN_FILE = "admin_token"


def create_app(
    settings: Settings,
    *,
    upstream: Upstream | None = None,
    clock: Clock | None = None,
    admission: Admission | None = None,
    metrics: Metrics | None = None,
    tracer_provider: TracerProvider | None = None,
) -> Starlette:
    clock = clock or SystemClock()
    metrics = metrics or Metrics()
    admin_token = resolve_admin_token(settings)
    gateway_id = settings.gateway_id or f"{socket.gethostname()}:{settings.port}"
    own_provider = tracer_provider is None
    provider = tracer_provider or build_tracer_provider(settings.otlp_endpoint)
    tracer = provider.get_tracer(TRACER_NAME)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        database = Database.from_url(settings.database_url)
        upstream_config = settings.upstream()
        the_upstream = upstream or build_upstream(upstream_config)
        meter: Meter | None = None
        inflight = Inflight()
        instances = InstanceRegistry(database, clock, quota_store=store_name(settings))
        listener = None
        if settings.metrics_port:
            listener = MetricsListener(
                metrics.registry, host=settings.metrics_host, port=settings.metrics_port
            )
        joined = False
        prices = PriceBook(settings.file.prices)
        quotas = QuotaAdmission(
            build_store(settings, clock),
            defaults=settings.file.quotas,
            prices=prices,
            clock=clock,
            metrics=metrics,
            fail_mode=settings.quota_fail_mode,
            timeout_s=settings.quota_timeout_s,
            lease_s=settings.quota_lease_s,
        )
        try:
            await database.migrate()
            await instances.join()
            joined = True
            if listener is not None:
                await listener.start()
            catalog = await build_catalog(settings, upstream_config, the_upstream)
            metrics.register_models(catalog.ids(), upstream_config.kind)
            tenants = TenantStore(database, clock)
            ledger = Ledger(database)
            meter = Meter(
                ledger,
                spool=settings.state_dir / "usage-spool.jsonl",
                batch_size=settings.meter_batch_size,
                linger_s=settings.meter_linger_s,
            )
            await meter.start()  # replays what a previous run spooled, before seeding
            metrics.seed(await ledger.counter_seed(gateway_id, now=clock.now()))
            app.state.sluis = GatewayState(
                settings=settings,
                clock=clock,
                database=database,
                tenants=tenants,
                ledger=ledger,
                audit=AuditLog(database),
                meter=meter,
                authenticator=Authenticator(tenants, clock, cache_ttl_s=settings.key_cache_ttl_s),
                admission=admission or quotas,
                quotas=quotas,
                metrics=metrics,
                catalog=catalog,
                upstream=the_upstream,
                upstream_config=upstream_config,
                inflight=inflight,
                gateway_id=gateway_id,
                tracer=tracer,
                prices=prices,
            )
            # Start-up leaves ~10^5 long-lived objects (SQLAlchemy, pydantic, ...); freezing them
            # keeps full garbage collections, which would scan them all, from pausing requests.
            gc.collect()
            gc.freeze()
            log.info("gateway ready: models %s", ", ".join(catalog.ids()) or "(none)")
            yield
        finally:
            # Streams cut by the server's shutdown still write their usage records: wait for them.
            if not await inflight.wait_idle(limit_s=5):
                log.warning("%d requests still in flight at shutdown", inflight.count)
            await quotas.aclose(drain_s=5)
            if meter is not None:
                await meter.aclose(drain_s=settings.shutdown_drain_s)
                log.info("gateway stopped; %d usage records written", meter.written)
            await the_upstream.aclose()
            if listener is not None:
                await listener.stop()
            if own_provider and hasattr(provider, "shutdown"):
                provider.shutdown()  # flushes spans still batched for export
            if joined:
                await instances.leave()
            await database.dispose()

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        *tenant_routes(),
        admin_mount(admin_token),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(RequestIdMiddleware), Middleware(TracingMiddleware, tracer=tracer)],
        exception_handlers={
            SluisError: _render_error,
            Exception: _render_crash,
            404: _render_not_found,
            405: _render_not_found,
        },
        lifespan=lifespan,
    )


async def build_catalog(
    settings: Settings, upstream_config: UpstreamConfig, upstream: Upstream
) -> ModelCatalog:
    """The configured models, or (none configured) whatever the upstream serves."""
    if settings.file.models:
        return ModelCatalog(
            Model(
                id=m.id,
                task=m.task,
                upstream_model=m.upstream_model or m.id,
                owned_by=m.owned_by,
                tokenizer=m.tokenizer,
                max_output_tokens=m.max_output_tokens,
            )
            for m in settings.file.models
        )
    deadline = asyncio.get_running_loop().time() + upstream_config.connect_timeout_s * 6
    while True:
        try:
            names = await upstream.list_models()
            break
        except UpstreamUnavailable as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise ConfigError(
                    f"no models configured and the upstream's model list is unavailable: "
                    f"{exc.message}"
                ) from exc
            await asyncio.sleep(0.5)
    return ModelCatalog(
        Model(id=name, task="embed" if "embed" in name else "generate", upstream_model=name)
        for name in names
    )


def resolve_admin_token(settings: Settings) -> str:
    """`SLUIS_ADMIN_TOKEN`, or the one in the state folder, or a new one written there (0600)."""
    if settings.admin_token is not None:
        return settings.admin_token.get_secret_value()
    path = admin_token_path(settings)
    if path.exists():
        token = path.read_text().strip()
        if len(token) >= 16:
            return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = "sluis-admin-" + secrets.token_urlsafe(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(token + "\n")
    log.warning("generated an admin token in %s", path)
    return token


def admin_token_path(settings: Settings) -> Path:
    return settings.state_dir / ADMIN_TOKEN_FILE


async def _render_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SluisError)
    return Response(
        exc.body(),
        status_code=exc.status_code,
        media_type="application/json",
        headers=exc.headers(),
    )


async def _render_not_found(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    message = "Unknown route." if status == 404 else "Method not allowed on this route."
    code = "unknown_route" if status == 404 else "method_not_allowed"
    return Response(
        error_body(message, "invalid_request_error", code),
        status_code=status,
        media_type="application/json",
    )


async def _render_crash(request: Request, exc: Exception) -> Response:
    rid = request.scope.get("state", {}).get("request_id", "")
    log.exception("unhandled error in request %s", rid)
    return Response(
        error_body("The gateway failed to handle this request.", "server_error", "internal_error"),
        status_code=500,
        media_type="application/json",
        headers={"x-request-id": rid} if rid else None,
    )
