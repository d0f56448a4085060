"""Who is calling: a tenant key in `Authorization: Bearer ...` becomes a `Principal`.

Malformed keys are refused before any store lookup. Grants are cached for a few seconds so the hot
path does not touch the database; admin changes clear the cache at once on this gateway, and other
gateways see them within `key_cache_ttl_s`. Public ids the store does not know are remembered as
unknown for as long (in a bounded cache), so a client repeating a well-formed bogus key costs one
query per TTL, not one per request. A key is only ever created with a fresh random id, so nobody
holds a real key whose id this gateway could have remembered as unknown.

Concurrent requests with one uncached key share one lookup, run as a task of its own: a caller
that is cancelled stops waiting, the lookup and the other callers carry on.
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
NEGATIVE_CACHE_SIZE = 10_000


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
    def __init__(
        self,
        store: TenantStore,
        clock: Clock,
        *,
        cache_ttl_s: float,
        negative_cache_size: int = NEGATIVE_CACHE_SIZE,
    ) -> None:
        self._store = store
        self._clock = clock
        self._ttl = cache_ttl_s
        self._cache: dict[str, tuple[float, KeyGrant]] = {}
        # Unknown public id -> when the store said so; oldest first (insertion order).
        self._unknown: dict[str, float] = {}
        self._unknown_limit = negative_cache_size
        self._lookups: dict[str, asyncio.Task[KeyGrant | None]] = {}

    def invalidate(self) -> None:
        self._cache.clear()
        self._unknown.clear()

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
        unknown_since = self._unknown.get(public_id)
        if unknown_since is not None and now - unknown_since < self._ttl:
            return None
        grant = await self._lookup(public_id)
        if self._ttl <= 0:
            return grant
        if grant is not None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[public_id] = (now, grant)
        else:
            self._remember_unknown(public_id, now)
        return grant

    def _remember_unknown(self, public_id: str, now: float) -> None:
        self._unknown.pop(public_id, None)  # re-inserted last: the order stays oldest first
        while self._unknown and len(self._unknown) >= self._unknown_limit:
            del self._unknown[next(iter(self._unknown))]
        if self._unknown_limit > 0:
            self._unknown[public_id] = now

    async def _lookup(self, public_id: str) -> KeyGrant | None:
        """One store query per key at a time: a burst of requests with a key not yet cached
        waits for the same answer instead of each taking a database connection."""
        task = self._lookups.get(public_id)
        if task is None:
            task = asyncio.create_task(self._store.grant_for(public_id))
            self._lookups[public_id] = task
            task.add_done_callback(lambda done: self._finished(public_id, done))
        # Shielded: a caller cancelled while waiting leaves the lookup running for the others.
        return await asyncio.shield(task)

    def _finished(self, public_id: str, task: asyncio.Task[KeyGrant | None]) -> None:
        if self._lookups.get(public_id) is task:
            del self._lookups[public_id]
        if not task.cancelled():
            task.exception()  # retrieved: a failure nobody waits for any more is not "lost"
