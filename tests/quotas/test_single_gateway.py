"""In-process quotas are exact only for one gateway: a second gateway is refused at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.app import create_app
from gateway.settings import ConfigError, Settings
from tests.conftest import ADMIN_TOKEN, GatewayFactory
from tests.quotas.conftest import REDIS_URL


def _settings(tmp_path: Path, redis_url: str | None) -> Settings:
    return Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/sluis.db",
        admin_token=ADMIN_TOKEN,
        state_dir=tmp_path / "other",
        upstream_url="http://127.0.0.1:9",
        redis_url=redis_url,
        metrics_port=0,
        file={"models": [{"id": "fake-chat"}]},
    )


@pytest.mark.parametrize(
    "second", [None, REDIS_URL], ids=["memory-beside-memory", "redis-beside-memory"]
)
async def test_nothing_starts_beside_a_memory_quota_gateway(
    gateway_factory: GatewayFactory, tmp_path: Path, second: str | None
) -> None:
    first = gateway_factory()
    app = create_app(_settings(tmp_path, second))
    with pytest.raises(ConfigError, match="memory"):
        async with app.router.lifespan_context(app):
            pass
    first.stop()
    async with app.router.lifespan_context(app):  # alone now: starts
        pass


async def test_a_memory_gateway_does_not_start_beside_a_redis_one(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    gateway_factory(redis_url=REDIS_URL)
    app = create_app(_settings(tmp_path, None))
    with pytest.raises(ConfigError, match="SLUIS_REDIS_URL"):
        async with app.router.lifespan_context(app):
            pass
