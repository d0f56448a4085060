"""The admin API under `/admin/v1`: tenants, keys, usage, the audit log and readiness."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from gateway.body import parse_json_object, read_limited_body
from gateway.errors import InvalidRequest
from gateway.health import readyz_detail
from gateway.middleware import AdminGuard
from gateway.state import GatewayState, gateway_state
from gateway.tenancy.ledger import UsageFilter
from gateway.tenancy.records import ALL_MODELS
from quotas.policy import LIMIT_FIELDS, QuotaSettings

_ADMIN_BODY_LIMIT = 64 * 1024
_Body = TypeVar("_Body", bound=BaseModel)


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CreateTenant(_Input):
    name: str
    models: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    quotas: QuotaSettings | None = None


class UpdateTenant(_Input):
    models: list[str] | None = None
    metadata: dict[str, Any] | None = None
    status: Literal["active", "suspended"] | None = None
    # A JSON merge patch (RFC 7396) of the tenant's quota settings: a field left out is kept,
    # null removes it (back to the default), "unlimited" lifts it; `"quotas": null` removes all.
    quotas: QuotaSettings | None = None


_MAX_KEY_LIFETIME_S = 10 * 365 * 24 * 3600  # ten years: far from datetime's range (year 9999)


class CreateKey(_Input):
    name: str = Field(default="default", min_length=1, max_length=128)
    expires_in_s: int | None = Field(default=None, ge=1, le=_MAX_KEY_LIFETIME_S)


class RotateKey(_Input):
    grace_s: int = Field(default=24 * 3600, ge=0, le=30 * 24 * 3600)


async def create_tenant(request: Request) -> Response:
    state = gateway_state(request)
    data = await _body(request, CreateTenant)
    tenant = await state.tenants.create_tenant(
        data.name,
        models=_known_models(state, data.models),
        metadata=data.metadata,
        actor=_actor(request),
        quotas=_quota_patch(state, data.quotas),
    )
    return _json(tenant.to_json(), 201, etag=tenant.etag)


async def list_tenants(request: Request) -> Response:
    tenants = await gateway_state(request).tenants.list_tenants()
    return _json({"object": "list", "data": [tenant.to_json() for tenant in tenants]})


async def get_tenant(request: Request) -> Response:
    tenant = await gateway_state(request).tenants.get_tenant(request.path_params["ref"])
    return _json(tenant.to_json(), etag=tenant.etag)


async def update_tenant(request: Request) -> Response:
    """PATCH: without If-Match it always applies; with it, only to the version named (else 412)."""
    state = gateway_state(request)
    data = await _body(request, UpdateTenant)
    quota_patch = None
    if data.quotas is not None:
        quota_patch = _quota_patch(state, data.quotas)
    elif "quotas" in data.model_fields_set:
        quota_patch = dict.fromkeys((*LIMIT_FIELDS, "models"))
    tenant = await state.tenants.update_tenant(
        request.path_params["ref"],
        actor=_actor(request),
        models=None if data.models is None else _known_models(state, data.models),
        metadata=data.metadata,
        status=data.status,
        quota_patch=quota_patch,
        expected_versions=_if_match(request),
    )
    state.authenticator.invalidate()
    return _json(tenant.to_json(), etag=tenant.etag)


async def tenant_quota(request: Request) -> Response:
    state = gateway_state(request)
    tenant = await state.tenants.get_tenant(request.path_params["ref"])
    policy = state.quotas.policy_for(tenant)
    limits = await state.quotas.report(tenant.id, policy)
    return _json(
        {
            "object": "quota",
            "tenant": tenant.name,
            "policy": policy.model_dump(exclude_none=True),
            "limits": limits,
        }
    )


async def create_key(request: Request) -> Response:
    state = gateway_state(request)
    data = await _body(request, CreateKey)
    expires_at = None
    if data.expires_in_s is not None:
        expires_at = state.clock.now() + timedelta(seconds=data.expires_in_s)
    key, plaintext = await state.tenants.create_key(
        request.path_params["ref"], actor=_actor(request), name=data.name, expires_at=expires_at
    )
    return _json({**key.to_json(), "key": plaintext}, 201)


async def list_keys(request: Request) -> Response:
    keys = await gateway_state(request).tenants.list_keys(request.path_params["ref"])
    return _json({"object": "list", "data": [key.to_json() for key in keys]})


async def revoke_key(request: Request) -> Response:
    state = gateway_state(request)
    key = await state.tenants.revoke_key(request.path_params["key_id"], actor=_actor(request))
    state.authenticator.invalidate()
    return _json(key.to_json())


async def rotate_key(request: Request) -> Response:
    state = gateway_state(request)
    data = await _body(request, RotateKey)
    new, plaintext, old = await state.tenants.rotate_key(
        request.path_params["key_id"], actor=_actor(request), grace=timedelta(seconds=data.grace_s)
    )
    state.authenticator.invalidate()
    return _json({**new.to_json(), "key": plaintext, "previous": old.to_json()}, 201)


async def usage(request: Request) -> Response:
    state = gateway_state(request)
    where = await _usage_filter(request, state)
    totals = await state.ledger.totals(where)
    return _json(
        {
            "object": "list",
            "from": _iso(where.start),
            "to": _iso(where.end),
            "data": [total.to_json() for total in totals],
        }
    )


async def usage_records(request: Request) -> Response:
    state = gateway_state(request)
    where = await _usage_filter(request, state)
    limit = _int_param(request, "limit", 100, maximum=10_000)
    records = await state.ledger.records(where, limit=limit)
    return _json({"object": "list", "data": [record.to_json() for record in records]})


async def audit(request: Request) -> Response:
    state = gateway_state(request)
    tenant_ref = request.query_params.get("tenant")
    tenant_id = (await state.tenants.get_tenant(tenant_ref)).id if tenant_ref else None
    limit = _int_param(request, "limit", 100, maximum=10_000)
    entries = await state.audit.entries(tenant_id=tenant_id, limit=limit)
    return _json({"object": "list", "data": [entry.to_json() for entry in entries]})


def admin_mount(token: str) -> Mount:
    routes = [
        Route("/tenants", create_tenant, methods=["POST"]),
        Route("/tenants", list_tenants, methods=["GET"]),
        Route("/tenants/{ref}", get_tenant, methods=["GET"]),
        Route("/tenants/{ref}", update_tenant, methods=["PATCH"]),
        Route("/tenants/{ref}/quota", tenant_quota, methods=["GET"]),
        Route("/tenants/{ref}/keys", create_key, methods=["POST"]),
        Route("/tenants/{ref}/keys", list_keys, methods=["GET"]),
        Route("/keys/{key_id}", revoke_key, methods=["DELETE"]),
        Route("/keys/{key_id}/rotate", rotate_key, methods=["POST"]),
        Route("/usage", usage, methods=["GET"]),
        Route("/usage/records", usage_records, methods=["GET"]),
        Route("/audit", audit, methods=["GET"]),
        Route("/readyz", readyz_detail, methods=["GET"]),
    ]
    return Mount("/admin/v1", routes=routes, middleware=[Middleware(AdminGuard, token=token)])


async def _body(request: Request, schema: type[_Body]) -> _Body:
    raw = await read_limited_body(request, _ADMIN_BODY_LIMIT)
    payload = parse_json_object(raw) if raw else {}
    try:
        return schema.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise InvalidRequest(
            f"Invalid value for '{field}': {first['msg']}.", code="invalid_value", param=field
        ) from exc


def _known_models(state: GatewayState, models: list[str]) -> tuple[str, ...]:
    for model in models:
        if model != ALL_MODELS and model not in state.catalog:
            raise InvalidRequest(
                f"Unknown model '{model}'; known models: {', '.join(state.catalog.ids())}.",
                code="model_not_found",
                param="models",
            )
    return tuple(dict.fromkeys(models))


def _quota_patch(state: GatewayState, quotas: QuotaSettings | None) -> dict[str, Any] | None:
    if quotas is None:
        return None
    # Settings of a model no longer in the catalog can still be removed (null).
    _known_models(state, [model for model, own in (quotas.models or {}).items() if own is not None])
    return quotas.as_patch()


def _if_match(request: Request) -> frozenset[int] | None:
    """The versions an If-Match header accepts; None when any will do (absent, or `*`).

    Entity tags compare strongly (RFC 9110): a weak tag (W/"3") never matches. A bare number
    is taken as the tag it names, for people typing headers by hand.
    """
    header = request.headers.get("if-match")
    if header is None or header.strip() == "*":
        return None
    versions: set[int] = set()
    for part in header.split(","):
        tag = part.strip()
        if tag.startswith('"') and tag.endswith('"') and len(tag) >= 2:
            tag = tag[1:-1]
        if tag.isascii() and tag.isdigit():
            versions.add(int(tag))
    return frozenset(versions)


async def _usage_filter(request: Request, state: GatewayState) -> UsageFilter:
    params = request.query_params
    tenant_ref = params.get("tenant")
    tenant_id = (await state.tenants.get_tenant(tenant_ref)).id if tenant_ref else None
    return UsageFilter(
        tenant_id=tenant_id,
        model=params.get("model") or None,
        start=_when(params.get("from"), "from"),
        end=_when(params.get("to"), "to"),
        request_id=params.get("request_id") or None,
    )


def _when(value: str | None, name: str) -> datetime | None:
    """An ISO date (midnight UTC) or datetime (UTC unless it says otherwise)."""
    if not value:
        return None
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), time(), tzinfo=UTC)
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidRequest(f"'{name}' must be an ISO date or datetime.", param=name) from exc
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


def _int_param(request: Request, name: str, default: int, *, maximum: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= maximum:
        raise InvalidRequest(f"'{name}' must be a whole number from 1 to {maximum}.", param=name)
    return int(raw)


def _actor(request: Request) -> str:
    actor: str = request.scope["state"].get("actor", "admin")
    return actor


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _json(payload: object, status: int = 200, *, etag: str | None = None) -> Response:
    headers = None if etag is None else {"etag": etag}
    return Response(
        orjson.dumps(payload), status_code=status, media_type="application/json", headers=headers
    )
