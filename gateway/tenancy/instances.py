"""The gateways sharing this database, each with a heartbeat.

In-process (`memory`) quotas are only exact when one gateway process enforces them, so a gateway
using them refuses to start beside any other live gateway, and no gateway starts beside one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from datetime import timedelta

from sqlalchemy import delete, select, text, update

from gateway.clock import Clock
from gateway.errors import StoreUnavailable
from gateway.settings import ConfigError
from gateway.tenancy.database import Database
from gateway.tenancy.errors import store_errors
from gateway.tenancy.tables import gateway_instances

log = logging.getLogger("sluis.instances")

HEARTBEAT_S = 10.0
STALE_AFTER_S = 30.0


class InstanceRegistry:
    def __init__(self, db: Database, clock: Clock, *, quota_store: str) -> None:
        self._db = db
        self._clock = clock
        self._quota_store = quota_store
        self.instance_id = f"gw_{secrets.token_hex(8)}"
        self._task: asyncio.Task[None] | None = None

    async def join(self) -> None:
        now = self._clock.now()
        with store_errors():
            async with self._db.engine.begin() as conn:
                if self._db.dialect == "postgresql":
                    await conn.execute(text("SELECT pg_advisory_xact_lock(7263552)"))
                await conn.execute(
                    delete(gateway_instances).where(
                        gateway_instances.c.heartbeat_at < now - timedelta(seconds=STALE_AFTER_S)
                    )
                )
                others = (await conn.execute(select(gateway_instances))).all()
                alone = self._quota_store != "memory" or not others
                memory_peer = [row for row in others if row.quota_store == "memory"]
                if not alone or memory_peer:
                    peer = (memory_peer or others)[0]
                    raise ConfigError(
                        "in-process (memory) quotas need the gateway to run alone, and another "
                        f"gateway is running ({peer.host} pid {peer.pid}, quotas "
                        f"{peer.quota_store}); set SLUIS_REDIS_URL on every gateway (or wait "
                        f"{STALE_AFTER_S:.0f} s if that gateway has died)"
                    )
                await conn.execute(
                    gateway_instances.insert().values(
                        id=self.instance_id,
                        host=socket.gethostname()[:255],
                        pid=os.getpid(),
                        quota_store=self._quota_store,
                        started_at=now,
                        heartbeat_at=now,
                    )
                )
        self._task = asyncio.create_task(self._beat(), name="sluis-heartbeat")

    async def leave(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(StoreUnavailable), store_errors():
            async with self._db.engine.begin() as conn:
                await conn.execute(
                    delete(gateway_instances).where(gateway_instances.c.id == self.instance_id)
                )

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                with store_errors():
                    async with self._db.engine.begin() as conn:
                        await conn.execute(
                            update(gateway_instances)
                            .where(gateway_instances.c.id == self.instance_id)
                            .values(heartbeat_at=self._clock.now())
                        )
            except StoreUnavailable:
                log.warning("could not record this gateway's heartbeat")
