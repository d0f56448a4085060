"""Quota stores by name: `memory` (one gateway process) and `redis` (any number)."""

from __future__ import annotations

from collections.abc import Callable

from gateway.clock import Clock
from gateway.settings import ConfigError, Settings
from quotas.allowances import AllowanceStore
from quotas.memory import MemoryStore
from quotas.redis import RedisStore
from quotas.store import QuotaStore


def _memory(settings: Settings, clock: Clock) -> QuotaStore:
    return MemoryStore()


def _redis(settings: Settings, clock: Clock) -> QuotaStore:
    assert settings.redis_url is not None
    store = RedisStore(
        settings.redis_url,
        timeout_s=settings.quota_timeout_s,
        settle_timeout_s=settings.quota_settle_timeout_s,
        clock=lambda: clock.now().timestamp(),
    )
    if not settings.quota_allowances:
        return store
    return AllowanceStore(store, clock=lambda: clock.now().timestamp())


STORES: dict[str, Callable[[Settings, Clock], QuotaStore]] = {"memory": _memory, "redis": _redis}


def store_name(settings: Settings) -> str:
    return "memory" if settings.redis_url is None else "redis"


def build_store(settings: Settings, clock: Clock) -> QuotaStore:
    name = store_name(settings)
    factory = STORES.get(name)
    if factory is None:
        raise ConfigError(f"quota store: unknown {name!r}; known: {sorted(STORES)}")
    return factory(settings, clock)
