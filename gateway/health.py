"""`/healthz` (the process answers) and `/readyz` (the store and every model's upstream answer)."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import SluisError
from gateway.state import gateway_state
from quotas.store import StoreFailure


async def healthz(_: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


async def readyz(request: Request) -> Response:
    state = gateway_state(request)
    checks: dict[str, str] = {}
    try:
        await state.database.ping()
        checks["database"] = "ok"
    except Exception as exc:  # any failure means "not ready"; the check says which
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        await state.quotas.ping()
        checks["quota_store"] = "ok"
    except StoreFailure as exc:
        checks["quota_store"] = f"unavailable: {exc}"
    try:
        served = set(await state.upstream.list_models())
        for model in state.catalog:
            checks[f"model:{model.id}"] = "ok" if model.upstream_model in served else "missing"
    except SluisError as exc:
        checks["upstream"] = f"unavailable: {exc.message}"
    ready = all(value == "ok" for value in checks.values())
    headers = {} if ready else {"retry-after": "5"}
    body = {"status": "ready" if ready else "not_ready", "checks": checks}
    return Response(
        orjson.dumps(body),
        status_code=200 if ready else 503,
        media_type="application/json",
        headers=headers,
    )
