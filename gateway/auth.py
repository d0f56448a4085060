"""Who is calling: a tenant key in `Authorization: Bearer ...` becomes a `Principal`.

Malformed keys are refused before any store lookup. Grants are cached for a few seconds so the hot
path does not touch the database; admin changes clear the cache at once on this gateway, and other
gateways see them within `key_cache_ttl_s`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from gateway.clock import Clock
from gateway.errors import AuthenticationFailed, PermissionDenied
from gateway.keys import parse_key, secret_matches
from gateway.tenancy.records import KeyGrant, Tenant
from gateway.tenancy.tenants import TenantStore

_CACHE_LIMIT = 100_000


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: Tenant
    key_id: str


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Authenticator:
    def __init__(self, store: TenantStore, clock: Clock, *, cache_ttl_s: float) -> None:
        self._store = store
        self._clock = clock
        self._ttl = cache_ttl_s
        self._cache: dict[str, tuple[float, KeyGrant]] = {}
        self._lookups: dict[str, asyncio.Future[KeyGrant | None]] = {}

    def invalidate(self) -> None:
        self._cache.clear()

    async def authenticate(self, authorization: str | None) -> Principal:
        token = bearer_token(authorization)
        if token is None:
            raise AuthenticationFailed(
                "Missing API key: send 'Authorization: Bearer sk-sluis-...'.",
                code="missing_api_key",
            )
        parsed = parse_key(token)
        if parsed is None:
            raise AuthenticationFailed("Malformed API key.", code="invalid_api_key")
        grant = await self._grant(parsed.public_id)
        if grant is None or not secret_matches(parsed, grant.secret_hash):
            raise AuthenticationFailed("Incorrect API key provided.", code="invalid_api_key")
        key = grant.key
        if key.revoked_at is not None:
            raise AuthenticationFailed("This API key has been revoked.", code="api_key_revoked")
        if key.expires_at is not None and self._clock.now() >= key.expires_at:
            raise AuthenticationFailed("This API key has expired.", code="api_key_expired")
        if grant.tenant.status != "active":
            raise PermissionDenied(
                f"The tenant '{grant.tenant.name}' is suspended.", code="tenant_suspended"
            )
        return Principal(tenant=grant.tenant, key_id=key.id)

    async def _grant(self, public_id: str) -> KeyGrant | None:
        now = self._clock.monotonic()
        cached = self._cache.get(public_id)
        if cached is not None and now - cached[0] < self._ttl:
            return cached[1]
        grant = await self._lookup(public_id)
        if grant is not None and self._ttl > 0:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[public_id] = (now, grant)
        return grant

    async def _lookup(self, public_id: str) -> KeyGrant | None:
        """One store query per key at a time: a burst of requests with a key not yet cached
        waits for the same answer instead of each taking a database connection."""
        pending = self._lookups.get(public_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[KeyGrant | None] = asyncio.get_running_loop().create_future()
        self._lookups[public_id] = future
        try:
            grant = await self._store.grant_for(public_id)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here, so an unshared failure is not logged as lost
            raise
        else:
            future.set_result(grant)
            return grant
        finally:
            del self._lookups[public_id]
