"""`/healthz` (the process answers) and `/readyz` (the store and every model's upstream answer).

`/readyz` needs no authentication (load balancers and kubelets call it), so it says no more than
ready or not, and one word per check (`ok`, `unavailable`, `missing`, `unknown`): no error text,
host, URL or model id. The admin API's `GET /admin/v1/readyz` answers with the same status and
`Retry-After`, and says why: each failure's text, each catalog model by id, and the upstream's
URL without its credentials.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import SluisError
from gateway.state import GatewayState, gateway_state
from quotas.store import StoreFailure

MODEL_CHECK = "model:"


async def healthz(_: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


async def readyz(request: Request) -> Response:
    checks = await _checks(gateway_state(request))
    return _answer({"checks": _public(checks)}, _ready(checks))


async def readyz_detail(request: Request) -> Response:
    """The admin's view: the reasons too."""
    state = gateway_state(request)
    checks = await _checks(state)
    config = state.upstream_config
    upstream = {"kind": config.kind, "url": without_credentials(config.url)}
    return _answer({"checks": checks, "upstream": upstream}, _ready(checks))


async def _checks(state: GatewayState) -> dict[str, str]:
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
        served = {served.id for served in await state.upstream.list_models()}
        for model in state.catalog:
            ok = model.upstream_model in served
            checks[f"{MODEL_CHECK}{model.id}"] = "ok" if ok else "missing"
    except SluisError as exc:
        checks["upstream"] = f"unavailable: {exc.message}"
    return checks


def _public(checks: dict[str, str]) -> dict[str, str]:
    """One word per check; the models as one check, so that none is named."""
    words = {name: value.partition(":")[0] for name, value in checks.items()}
    models = [word for name, word in words.items() if name.startswith(MODEL_CHECK)]
    upstream = words.get("upstream", "ok")
    if upstream != "ok":
        served = "unknown"
    else:
        served = "ok" if all(word == "ok" for word in models) else "missing"
    return {
        "database": words["database"],
        "quota_store": words["quota_store"],
        "upstream": upstream,
        "models": served,
    }


def _ready(checks: dict[str, str]) -> bool:
    return all(value == "ok" for value in checks.values())


def _answer(body: dict[str, Any], ready: bool) -> Response:
    return Response(
        orjson.dumps({"status": "ready" if ready else "not_ready", **body}),
        status_code=200 if ready else 503,
        media_type="application/json",
        headers={} if ready else {"retry-after": "5"},
    )


def without_credentials(url: str | None) -> str | None:
    """The URL with any `user:pass@` taken out."""
    if url is None:
        return None
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
