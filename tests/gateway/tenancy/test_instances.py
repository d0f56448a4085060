"""The registry of live gateways, against the real PostgreSQL server."""

from __future__ import annotations

import asyncio
import logging
import secrets
from datetime import UTC, datetime

import pytest
from sqlalchemy import select, text

from gateway.clock import ManualClock
from gateway.tenancy import instances
from gateway.tenancy.database import Database
from gateway.tenancy.instances import InstanceRegistry
from gateway.tenancy.tables import gateway_instances


async def _heartbeat_at(db: Database, instance_id: str) -> datetime | None:
    async with db.engine.connect() as conn:
        query = select(gateway_instances.c.heartbeat_at).where(
            gateway_instances.c.id == instance_id
        )
        value: datetime | None = (await conn.execute(query)).scalar()
    return value


async def _rename_heartbeat_column(db: Database, old: str, new: str) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(text(f"ALTER TABLE gateway_instances RENAME COLUMN {old} TO {new}"))


@pytest.mark.postgres
async def test_the_heartbeat_outlives_an_unexpected_error(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A schema mismatch (a rolling upgrade) is no outage: store_errors lets it through. The
    heartbeat logs and counts it, and beats again once the schema is back."""
    monkeypatch.setattr(instances, "HEARTBEAT_S", 0.05)
    db = Database.from_url(postgres_url)
    await db.migrate()
    clock = ManualClock(datetime.now(UTC))
    registry = InstanceRegistry(
        db, clock, quota_store="redis", gateway_id=f"heartbeat-{secrets.token_hex(4)}"
    )
    await registry.join()
    renamed = False
    try:
        await _rename_heartbeat_column(db, "heartbeat_at", "heartbeat_moved")
        renamed = True
        with caplog.at_level(logging.ERROR, logger="sluis.instances"):
            await asyncio.sleep(0.3)  # several beats, each failing
        await _rename_heartbeat_column(db, "heartbeat_moved", "heartbeat_at")
        renamed = False
        clock.advance(60)
        for _ in range(100):
            if await _heartbeat_at(db, registry.instance_id) == clock.now():
                break
            await asyncio.sleep(0.05)
        assert await _heartbeat_at(db, registry.instance_id) == clock.now()
        assert registry.heartbeat_failures >= 2
        assert any("heartbeat" in r.getMessage() and r.exc_info for r in caplog.records)
    finally:
        if renamed:
            await _rename_heartbeat_column(db, "heartbeat_moved", "heartbeat_at")
        await registry.leave()
        await db.dispose()
