"""What the running gateway holds: built once in the lifespan, reached through `app.state`."""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.trace import Tracer
from starlette.requests import Request

from billing.prices import PriceBook
from gateway.admission import Admission
from gateway.auth import Authenticator
from gateway.catalog import ModelCatalog
from gateway.clock import Clock
from gateway.inflight import Inflight
from gateway.metering import Meter
from gateway.metrics import Metrics
from gateway.settings import Settings, UpstreamConfig
from gateway.tenancy.audit import AuditLog
from gateway.tenancy.database import Database
from gateway.tenancy.ledger import Ledger
from gateway.tenancy.tenants import TenantStore
from gateway.upstreams.base import Upstream
from quotas.admission import QuotaAdmission


@dataclass(frozen=True, slots=True)
class GatewayState:
    settings: Settings
    clock: Clock
    database: Database
    tenants: TenantStore
    ledger: Ledger
    audit: AuditLog
    meter: Meter
    authenticator: Authenticator
    admission: Admission
    catalog: ModelCatalog
    upstream: Upstream
    # The upstream's settings, resolved once (file, then SLUIS_UPSTREAM_URL / --upstream).
    upstream_config: UpstreamConfig
    inflight: Inflight
    gateway_id: str
    tracer: Tracer
    prices: PriceBook
    quotas: QuotaAdmission
    metrics: Metrics


def gateway_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.sluis
    return state


def request_id(request: Request) -> str:
    rid: str = request.scope["state"]["request_id"]
    return rid
