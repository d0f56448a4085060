"""Cross-cutting ASGI middleware, pure (no BaseHTTPMiddleware)."""

from __future__ import annotations

import hmac
import os
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth import bearer_token
from gateway.errors import AuthenticationFailed, PermissionDenied
from gateway.keys import looks_like_tenant_key

_ACTOR = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")


def new_request_id() -> str:
    return "req_" + os.urandom(16).hex()  # uuid4 without its object: the same 32 hex digits


class RequestIdMiddleware:
    """Gives every request an id (`req_...`), kept in `scope["state"]`, sent as `x-request-id`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        header = (b"x-request-id", rid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


class AdminGuard:
    """Only the admin token passes; a tenant key is refused outright, whatever route it asks for.

    The caller may name itself in `x-sluis-actor` (e.g. the operator's login) for the audit log.
    """

    def __init__(self, app: ASGIApp, *, token: str) -> None:
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        presented = bearer_token(headers.get(b"authorization", b"").decode("latin-1"))
        if presented is None:
            raise AuthenticationFailed(
                "The admin API needs 'Authorization: Bearer <admin token>'.",
                code="missing_admin_token",
            )
        if looks_like_tenant_key(presented):
            raise PermissionDenied("Tenant keys cannot use the admin API.", code="admin_only")
        if not hmac.compare_digest(presented.encode(), self._token):
            raise AuthenticationFailed("Incorrect admin token.", code="invalid_admin_token")
        actor = headers.get(b"x-sluis-actor", b"admin").decode("latin-1")
        scope.setdefault("state", {})["actor"] = actor if _ACTOR.match(actor) else "admin"
        await self.app(scope, receive, send)
