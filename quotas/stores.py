"""Quota stores by name: `memory` (one gateway process) and `redis` (any number)."""

from __future__ import annotations

from collections.abc import Callable

from gateway.settings import ConfigError, Settings
from quotas.memory import MemoryStore
from quotas.redis import RedisStore
from quotas.store import QuotaStore


def _memory(settings: Settings) -> QuotaStore:
    return MemoryStore()


def _redis(settings: Settings) -> QuotaStore:
    assert settings.redis_url is not None
    return RedisStore(settings.redis_url, timeout_s=settings.quota_timeout_s)


STORES: dict[str, Callable[[Settings], QuotaStore]] = {"memory": _memory, "redis": _redis}


def store_name(settings: Settings) -> str:
    return "memory" if settings.redis_url is None else "redis"


def build_store(settings: Settings) -> QuotaStore:
    name = store_name(settings)
    factory = STORES.get(name)
    if factory is None:
        raise ConfigError(f"quota store: unknown {name!r}; known: {sorted(STORES)}")
    return factory(settings)
