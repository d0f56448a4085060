"""The gateways sharing this database, each with a heartbeat.

In-process (`memory`) quotas are only exact when one gateway process enforces them, so a gateway
using them refuses to start beside any other live gateway, and no gateway starts beside one.

A gateway is registered under its gateway id (`SLUIS_GATEWAY_ID`), so two live gateways never
share one: each starts its billing counters from its id's ledger records, and invoices take the
latest value per id, so two processes under one id would each be billed the other's usage or
hide it. The second one is refused until the first has left or gone stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import socket
from datetime import timedelta

from sqlalchemy import delete, select, text, update
from sqlalchemy.exc import IntegrityError

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
    def __init__(
        self, db: Database, clock: Clock, *, quota_store: str, gateway_id: str | None = None
    ) -> None:
        self._db = db
        self._clock = clock
        self._quota_store = quota_store
        self._gateway_id = gateway_id
        self.instance_id = instance_key(gateway_id)
        self._task: asyncio.Task[None] | None = None
        self.heartbeat_failures = 0

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
                same_id = [row for row in others if row.id == self.instance_id]
                if same_id:
                    raise self._id_taken(f"{same_id[0].host} pid {same_id[0].pid}")
                try:
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
                except IntegrityError as exc:  # joined just now, beside us (SQLite: no lock)
                    raise self._id_taken("another process") from exc
        self._task = asyncio.create_task(self._beat(), name="sluis-heartbeat")

    def _id_taken(self, holder: str) -> ConfigError:
        return ConfigError(
            f"gateway id {self._gateway_id!r} is in use by a live gateway ({holder}); give "
            "every gateway its own SLUIS_GATEWAY_ID (or wait "
            f"{STALE_AFTER_S:.0f} s if that gateway has died)"
        )

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
                self.heartbeat_failures += 1
                log.warning("could not record this gateway's heartbeat")
            except Exception:
                # A bug or a schema mismatch rather than an outage: said loudly, and the beat
                # goes on, or the others would take this gateway for dead within STALE_AFTER_S.
                self.heartbeat_failures += 1
                log.exception("could not record this gateway's heartbeat")


def instance_key(gateway_id: str | None) -> str:
    """The registry's key for a gateway id (a digest: ids run to 128 characters, keys to 32),
    or a random one for a gateway without an id."""
    if gateway_id is None:
        return f"gw_{secrets.token_hex(8)}"
    return "id_" + hashlib.sha256(gateway_id.encode()).hexdigest()[:29]
