from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest

from quotas.memory import MemoryStore
from quotas.redis import RedisStore
from quotas.store import QuotaStore

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[QuotaStore]:
    the_store: QuotaStore = (
        MemoryStore() if request.param == "memory" else RedisStore(REDIS_URL, timeout_s=2.0)
    )
    yield the_store
    await the_store.aclose()


@pytest.fixture
def tenant() -> str:
    """A fresh tenant id per test, so Redis keys never collide between tests."""
    return f"ten_{secrets.token_hex(6)}"
