"""`create_app(settings)`: the gateway as one Starlette application, no module globals."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable
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
from gateway.metering import CANCEL_GRACE_S, Meter
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
from quotas.seeding import BudgetSeeds, LedgerUsage
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
        instances = InstanceRegistry(
            database, clock, quota_store=store_name(settings), gateway_id=gateway_id
        )
        listener = None
        if settings.metrics_port:
            listener = MetricsListener(
                metrics.registry, host=settings.metrics_host, port=settings.metrics_port
            )
        joined = False
        prices = PriceBook(settings.file.prices)
        seeds = BudgetSeeds()  # budgets start from the ledger, once it is open (below)
        quotas = QuotaAdmission(
            build_store(settings, clock, seeds),
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
                metrics=metrics,
                batch_size=settings.meter_batch_size,
                linger_s=settings.meter_linger_s,
            )
            await meter.start()  # replays what a previous run spooled, before seeding
            seeds.read_from(LedgerUsage(ledger, meter))
            metrics.seed(gateway_id, await ledger.counter_seed(gateway_id, now=clock.now()))
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
            # One budget for everything after the request drain (README, "Shutdown"): each step
            # runs even when one before it failed, none outlasts its share, and what the meter
            # holds is in the ledger or the spool before the closes (0.3 of the budget) begin.
            loop = asyncio.get_running_loop()
            budget = settings.shutdown_flush_s
            deadline = loop.time() + budget

            def left(reserve: float = 0.0) -> float:
                return max(0.0, deadline - reserve - loop.time())

            async def step(name: str, work: Awaitable[object], limit_s: float) -> None:
                task = asyncio.ensure_future(work)
                task.add_done_callback(lambda t: t.cancelled() or t.exception())
                done, _ = await asyncio.wait({task}, timeout=max(limit_s, 0.1))
                if not done:
                    task.cancel()  # not awaited: a step that resists it must not stall the rest
                    log.error("shutdown: %s did not end within %.1fs", name, limit_s)
                elif not task.cancelled() and task.exception() is not None:
                    log.error("shutdown: %s failed", name, exc_info=task.exception())

            # Streams cut by the server's shutdown still write their usage records: wait for them.
            if not await inflight.wait_idle(limit_s=min(0.2 * budget, left())):
                log.warning("%d requests still in flight at shutdown", inflight.count)
            await step("quota settles", quotas.aclose(drain_s=0.15 * budget), 0.2 * budget)
            if meter is not None:
                # Returns within drain + CANCEL_GRACE_S whatever the ledger does, never raises.
                drain = max(0.0, left(0.3 * budget) - CANCEL_GRACE_S)
                await step("usage meter", meter.aclose(drain_s=drain), drain + 2 * CANCEL_GRACE_S)
                log.info("gateway stopped; %d usage records written", meter.written)
            await step("upstream", the_upstream.aclose(), left())
            if listener is not None:
                await step("metrics listener", listener.stop(), left())
            if own_provider and hasattr(provider, "shutdown"):
                try:
                    provider.shutdown()  # flushes spans still batched for export
                except Exception:
                    log.exception("shutdown: tracing failed")
            if joined:
                await step("instance registry", instances.leave(), left())
            await step("database", database.dispose(), left())

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
                context_tokens=m.context_window(),
                media_tokens=m.media_tokens,
                media_urls=m.media_urls,
            )
            for m in settings.file.models
        )
    deadline = asyncio.get_running_loop().time() + upstream_config.connect_timeout_s * 6
    while True:
        try:
            served = await upstream.list_models()
            break
        except UpstreamUnavailable as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise ConfigError(
                    f"no models configured and the upstream's model list is unavailable: "
                    f"{exc.message}"
                ) from exc
            await asyncio.sleep(0.5)
    return ModelCatalog(
        Model(
            id=model.id,
            task="embed" if "embed" in model.id else "generate",
            upstream_model=model.id,
            context_tokens=model.context_tokens,
        )
        for model in served
    )


def resolve_admin_token(settings: Settings) -> str:
    """`SLUIS_ADMIN_TOKEN`, or the one in the state folder, or a new one written there (0600).

    A token file that group or others may read is refused, not fixed: whoever could read it
    may hold the token, and only the operator can tell whether that matters.
    """
    if settings.admin_token is not None:
        return settings.admin_token.get_secret_value()
    path = admin_token_path(settings)
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"{path}: the admin token file has mode {mode:o}, open to group or others; "
                f"chmod 600 it if nobody else has read it, or delete it to have a new one made"
            )
        token = path.read_text().strip()
        if len(token) >= 16:
            return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = "sluis-admin-" + secrets.token_urlsafe(32)
    # A new file (0600 from its creation) renamed over any old one, whose mode it never takes.
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w") as out:
            out.write(token + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
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
