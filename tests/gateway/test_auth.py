"""The authenticator on a real tenant store (SQLite): caching, negative caching, single flight."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.auth import Authenticator
from gateway.clock import ManualClock
from gateway.errors import AuthenticationFailed
from gateway.tenancy.database import Database
from gateway.tenancy.records import KeyGrant
from gateway.tenancy.tenants import TenantStore


class CountingStore(TenantStore):
    """The real store, counting its key lookups; `gate` (when set) holds each lookup."""

    def __init__(self, db: Database, clock: ManualClock) -> None:
        super().__init__(db, clock)
        self.lookups = 0
        self.gate: asyncio.Event | None = None

    async def grant_for(self, public_id: str) -> KeyGrant | None:
        self.lookups += 1
        if self.gate is not None:
            await self.gate.wait()
        return await super().grant_for(public_id)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def store(tmp_path: Path, clock: ManualClock) -> AsyncIterator[CountingStore]:
    db = Database.from_url(f"sqlite+aiosqlite:///{tmp_path}/auth.db")
    await db.migrate()
    yield CountingStore(db, clock)
    await db.dispose()


def bogus(index: int = 0) -> str:
    return f"sk-sluis-{index:012d}-" + "A" * 40


async def refused(auth: Authenticator, key: str) -> str:
    with pytest.raises(AuthenticationFailed) as caught:
        await auth.authenticate(f"Bearer {key}")
    return caught.value.code


async def test_an_unknown_key_costs_one_lookup_per_ttl(
    store: CountingStore, clock: ManualClock
) -> None:
    auth = Authenticator(store, clock, cache_ttl_s=5)
    for _ in range(50):
        assert await refused(auth, bogus()) == "invalid_api_key"
    assert store.lookups == 1
    clock.advance(5.1)
    assert await refused(auth, bogus()) == "invalid_api_key"
    assert store.lookups == 2


async def test_the_negative_cache_is_bounded(store: CountingStore, clock: ManualClock) -> None:
    auth = Authenticator(store, clock, cache_ttl_s=60, negative_cache_size=3)
    for index in range(4):  # one more than fits: the oldest is forgotten
        await refused(auth, bogus(index))
    assert store.lookups == 4
    await refused(auth, bogus(3))
    assert store.lookups == 4
    await refused(auth, bogus(0))
    assert store.lookups == 5


async def test_a_key_created_here_is_not_refused_from_the_negative_cache(
    store: CountingStore, clock: ManualClock
) -> None:
    auth = Authenticator(store, clock, cache_ttl_s=60)
    await store.create_tenant("acme", models=("*",), metadata={}, actor="test")
    _, key = await store.create_key("acme", actor="test")
    await refused(auth, key[:-1] + ("B" if key[-1] != "B" else "C"))  # wrong secret: cached
    auth.invalidate()
    principal = await auth.authenticate(f"Bearer {key}")
    assert principal.tenant.name == "acme"


async def test_a_cancelled_first_caller_does_not_fail_the_others(
    store: CountingStore, clock: ManualClock
) -> None:
    auth = Authenticator(store, clock, cache_ttl_s=5)
    await store.create_tenant("acme", models=("*",), metadata={}, actor="test")
    _, key = await store.create_key("acme", actor="test")
    store.gate = asyncio.Event()
    first = asyncio.create_task(auth.authenticate(f"Bearer {key}"))
    await asyncio.sleep(0.01)
    others = [asyncio.create_task(auth.authenticate(f"Bearer {key}")) for _ in range(3)]
    await asyncio.sleep(0.01)
    first.cancel()
    await asyncio.sleep(0.01)
    store.gate.set()
    principals = await asyncio.gather(*others)
    assert [p.tenant.name for p in principals] == ["acme"] * 3
    assert first.cancelled()
    assert store.lookups == 1


async def test_a_failed_lookup_is_not_cached(store: CountingStore, clock: ManualClock) -> None:
    from gateway.errors import StoreUnavailable

    auth = Authenticator(store, clock, cache_ttl_s=5)
    failing = True
    original = TenantStore.grant_for

    async def flaky(public_id: str) -> KeyGrant | None:
        store.lookups += 1
        await asyncio.sleep(0.01)  # long enough for the other callers to join this lookup
        if failing:
            raise StoreUnavailable("down")
        return await original(store, public_id)

    store.grant_for = flaky  # type: ignore[method-assign]
    waiters = [asyncio.create_task(auth.authenticate(f"Bearer {bogus()}")) for _ in range(3)]
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(result, StoreUnavailable) for result in results)
    assert store.lookups == 1
    failing = False
    assert await refused(auth, bogus()) == "invalid_api_key"
    assert store.lookups == 2
