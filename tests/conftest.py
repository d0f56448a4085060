from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.clock import Clock
from gateway.fake_engine import FakeEngine, FakeEngineConfig
from gateway.fake_server import create_fake_server
from gateway.settings import Settings
from gateway.state import GatewayState
from gateway.upstreams.base import Upstream
from tests.clients import admin_request
from tests.servers import ServerThread

ADMIN_TOKEN = "test-admin-token-0123456789"
POSTGRES_ADMIN_URL = os.environ.get(
    "SLUIS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="session")
def fake_engine() -> FakeEngine:
    return FakeEngine(FakeEngineConfig(max_context=512))


@pytest.fixture(scope="session")
def fake_engine_server(fake_engine: FakeEngine) -> Iterator[ServerThread]:
    server = ServerThread(create_fake_server(fake_engine)).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database on the real PostgreSQL server, dropped at the end."""
    import asyncpg

    name = f"sluis_test_{secrets.token_hex(4)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(POSTGRES_ADMIN_URL)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    # In a thread of its own: this fixture may be set up from inside a running event loop.
    def run(sql: str) -> None:
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, admin(sql)).result()

    run(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    yield f"{base}/{name}"
    run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class RunningGateway:
    server: ServerThread
    settings: Settings

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def state(self) -> GatewayState:
        state: GatewayState = self.server.app.state.sluis  # type: ignore[attr-defined]
        return state

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return admin_request(self.url, ADMIN_TOKEN, method, path, **kwargs)

    def create_tenant(self, name: str, models: list[str] | None = None) -> str:
        """A tenant with one key; returns the key."""
        response = self.admin("POST", "/tenants", json={"name": name, "models": models or ["*"]})
        assert response.status_code == 201, response.text
        response = self.admin("POST", f"/tenants/{name}/keys", json={})
        assert response.status_code == 201, response.text
        key: str = response.json()["key"]
        return key

    def flush(self) -> None:
        self.server.call(self.state.meter.flush())

    def records(self, **params: str) -> list[dict[str, Any]]:
        self.flush()
        response = self.admin("GET", "/usage/records", params={"limit": "10000", **params})
        assert response.status_code == 200, response.text
        data: list[dict[str, Any]] = response.json()["data"]
        return data

    def stop(self) -> None:
        self.server.stop()


GatewayFactory = Callable[..., RunningGateway]


@pytest.fixture
def gateway_factory(tmp_path: Path, fake_engine_server: ServerThread) -> Iterator[GatewayFactory]:
    started: list[RunningGateway] = []

    def start(
        *,
        upstream: Upstream | None = None,
        clock: Clock | None = None,
        database_url: str | None = None,
        graceful_s: int = 10,
        tracer_provider: Any = None,
        **overrides: Any,
    ) -> RunningGateway:
        values: dict[str, Any] = {
            "database_url": database_url or f"sqlite+aiosqlite:///{tmp_path}/sluis.db",
            "admin_token": ADMIN_TOKEN,
            "state_dir": tmp_path / "state",
            "upstream_url": None if upstream else fake_engine_server.url,
            "metrics_port": 0,
        }
        values.update(overrides)
        settings = Settings(**values)
        app = create_app(settings, upstream=upstream, clock=clock, tracer_provider=tracer_provider)
        running = RunningGateway(ServerThread(app, graceful_s=graceful_s).start(), settings)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.server._thread.is_alive():
            running.stop()


@pytest.fixture
def gateway(gateway_factory: GatewayFactory) -> RunningGateway:
    return gateway_factory()
