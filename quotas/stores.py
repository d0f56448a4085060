"""Quota stores by name: `memory` (one gateway process) and `redis` (any number)."""

from __future__ import annotations

from collections.abc import Callable

from gateway.clock import Clock
from gateway.settings import ConfigError, Settings
from quotas.allowances import AllowanceStore
from quotas.memory import MemoryStore
from quotas.redis import RedisStore
from quotas.store import QuotaStore, SeedSource


def _memory(settings: Settings, clock: Clock, seeds: SeedSource | None) -> QuotaStore:
    return MemoryStore(seeds=seeds)


def _redis(settings: Settings, clock: Clock, seeds: SeedSource | None) -> QuotaStore:
    assert settings.redis_url is not None
    store = RedisStore(
        settings.redis_url,
        timeout_s=settings.quota_timeout_s,
        settle_timeout_s=settings.quota_settle_timeout_s,
        clock=lambda: clock.now().timestamp(),
        seeds=seeds,
    )
    if not settings.quota_allowances:
        return store
    return AllowanceStore(store, clock=lambda: clock.now().timestamp())


StoreFactory = Callable[[Settings, Clock, SeedSource | None], QuotaStore]
STORES: dict[str, StoreFactory] = {"memory": _memory, "redis": _redis}


def store_name(settings: Settings) -> str:
    return "memory" if settings.redis_url is None else "redis"


def build_store(settings: Settings, clock: Clock, seeds: SeedSource | None = None) -> QuotaStore:
    """The configured store; `seeds` (the ledger) starts its budgets (`quotas/seeding.py`)."""
    name = store_name(settings)
    factory = STORES.get(name)
    if factory is None:
        raise ConfigError(f"quota store: unknown {name!r}; known: {sorted(STORES)}")
    return factory(settings, clock, seeds)
