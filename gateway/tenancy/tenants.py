"""Tenants and their API keys. Every change is audited in the same transaction."""

from __future__ import annotations

import re
import secrets
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.clock import Clock
from gateway.errors import Conflict, InvalidRequest, NotFound, SluisError
from gateway.keys import generate_key
from gateway.tenancy.audit import append_audit
from gateway.tenancy.database import Database
from gateway.tenancy.errors import store_errors
from gateway.tenancy.records import ApiKey, KeyGrant, Tenant, TenantStatus
from gateway.tenancy.tables import api_keys, tenants
from quotas.policy import patch_settings, shown_settings

TENANT_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")
_UPDATE_ATTEMPTS = 20
_TICK = timedelta(microseconds=1)


class PreconditionFailed(SluisError):
    """412: the tenant is no longer at the version the client read (If-Match)."""

    status = 412
    type = "invalid_request_error"
    default_code = "precondition_failed"

    def __init__(self, message: str, *, etag: str) -> None:
        super().__init__(message)
        self.etag = etag

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "etag": self.etag}


class TenantStore:
    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    # -- tenants ---------------------------------------------------------------------------

    async def create_tenant(
        self,
        name: str,
        *,
        models: tuple[str, ...],
        metadata: dict[str, Any],
        actor: str,
        quotas: dict[str, Any] | None = None,
    ) -> Tenant:
        """A new tenant; `quotas` are its settings as the admin API writes them."""
        if not TENANT_NAME.match(name):
            raise InvalidRequest(
                "Tenant names are 1-64 lowercase letters, digits and inner hyphens.",
                param="name",
            )
        now = self._clock.now()
        tenant = Tenant(
            id=f"ten_{secrets.token_hex(8)}",
            name=name,
            status="active",
            models=models,
            metadata=metadata,
            created_at=now,
            updated_at=now,
            quotas=patch_settings({}, quotas or {}),
        )
        try:
            with store_errors():
                async with self._db.engine.begin() as conn:
                    await conn.execute(
                        tenants.insert().values(
                            id=tenant.id,
                            name=tenant.name,
                            status=tenant.status,
                            models=list(tenant.models),
                            metadata=tenant.metadata,
                            quotas=tenant.quotas,
                            created_at=now,
                            updated_at=now,
                            version=tenant.version,
                        )
                    )
                    await append_audit(
                        conn,
                        at=now,
                        actor=actor,
                        action="tenant.create",
                        target_type="tenant",
                        target_id=tenant.id,
                        tenant_id=tenant.id,
                        details={"name": name, "models": list(models), "metadata": metadata},
                    )
        except IntegrityError as exc:
            raise Conflict(f"A tenant named '{name}' already exists.", param="name") from exc
        return tenant

    async def list_tenants(self) -> list[Tenant]:
        with store_errors():
            async with self._db.engine.connect() as conn:
                rows = (await conn.execute(select(tenants).order_by(tenants.c.name))).all()
        return [_tenant(row) for row in rows]

    async def get_tenant(self, ref: str) -> Tenant:
        """A tenant by id (`ten_...`) or by name."""
        with store_errors():
            async with self._db.engine.connect() as conn:
                return await self._get_tenant(conn, ref)

    async def update_tenant(
        self,
        ref: str,
        *,
        actor: str,
        models: tuple[str, ...] | None = None,
        metadata: dict[str, Any] | None = None,
        status: TenantStatus | None = None,
        quota_patch: dict[str, Any] | None = None,
        expected_versions: frozenset[int] | None = None,
    ) -> Tenant:
        """Apply the changes given; `quota_patch` merges into the quota settings (RFC 7396).

        With `expected_versions` the update happens only while the tenant is at one of them.
        The merge reads and writes in one transaction, and the write goes through only if the
        version is still the one read, so concurrent updates never lose one another's changes.
        """
        for _ in range(_UPDATE_ATTEMPTS):
            with store_errors():
                async with self._db.engine.begin() as conn:
                    tenant = await self._get_tenant(conn, ref, for_update=True)
                    if expected_versions is not None and tenant.version not in expected_versions:
                        raise PreconditionFailed(
                            f"Tenant '{tenant.name}' is at version {tenant.version}, not the one"
                            " If-Match names; read it again and retry.",
                            etag=tenant.etag,
                        )
                    changes: dict[str, Any] = {}
                    if quota_patch is not None:
                        changes["quotas"] = patch_settings(tenant.quotas, quota_patch)
                    if models is not None:
                        changes["models"] = list(models)
                    if metadata is not None:
                        changes["metadata"] = metadata
                    if status is not None:
                        changes["status"] = status
                    if not changes:
                        return tenant
                    # Strictly after the last update even within one clock tick: the quota
                    # admission caches a tenant's policy per (id, updated_at).
                    now = max(self._clock.now(), tenant.updated_at + _TICK)
                    written = await conn.execute(
                        update(tenants)
                        .where(tenants.c.id == tenant.id, tenants.c.version == tenant.version)
                        .values(updated_at=now, version=tenants.c.version + 1, **changes)
                    )
                    if written.rowcount != 1:
                        continue  # changed since it was read (SQLite takes no row lock): again
                    action = {"suspended": "tenant.suspend", "active": "tenant.activate"}.get(
                        str(status), "tenant.update"
                    )
                    details = dict(changes)
                    if quota_patch is not None:
                        details["quotas"] = shown_settings(changes["quotas"])
                        details["quota_patch"] = quota_patch
                    await append_audit(
                        conn,
                        at=now,
                        actor=actor,
                        action=action,
                        target_type="tenant",
                        target_id=tenant.id,
                        tenant_id=tenant.id,
                        details=details,
                    )
                    return await self._get_tenant(conn, tenant.id)
        raise Conflict(
            "The tenant kept changing while this update was applied; try again.",
            code="concurrent_update",
        )

    # -- keys ------------------------------------------------------------------------------

    async def create_key(
        self,
        tenant_ref: str,
        *,
        actor: str,
        name: str = "default",
        expires_at: datetime | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key; the plaintext is returned here and never again."""
        now = self._clock.now()
        with store_errors():
            async with self._db.engine.begin() as conn:
                tenant = await self._get_tenant(conn, tenant_ref)
                key, plaintext = await self._insert_key(conn, tenant.id, name, now, expires_at)
                await append_audit(
                    conn,
                    at=now,
                    actor=actor,
                    action="key.create",
                    target_type="api_key",
                    target_id=key.id,
                    tenant_id=tenant.id,
                    details={"name": name, "expires_at": _iso_or_none(expires_at)},
                )
        return key, plaintext

    async def list_keys(self, tenant_ref: str) -> list[ApiKey]:
        with store_errors():
            async with self._db.engine.connect() as conn:
                tenant = await self._get_tenant(conn, tenant_ref)
                rows = (
                    await conn.execute(
                        select(api_keys)
                        .where(api_keys.c.tenant_id == tenant.id)
                        .order_by(api_keys.c.created_at)
                    )
                ).all()
        return [_key(row) for row in rows]

    async def revoke_key(self, key_id: str, *, actor: str) -> ApiKey:
        now = self._clock.now()
        with store_errors():
            async with self._db.engine.begin() as conn:
                key = await self._get_key(conn, key_id)
                if key.revoked_at is not None:
                    return key
                await conn.execute(
                    update(api_keys).where(api_keys.c.id == key.id).values(revoked_at=now)
                )
                await append_audit(
                    conn,
                    at=now,
                    actor=actor,
                    action="key.revoke",
                    target_type="api_key",
                    target_id=key.id,
                    tenant_id=key.tenant_id,
                    details={},
                )
                return await self._get_key(conn, key.id)

    async def rotate_key(
        self, key_id: str, *, actor: str, grace: timedelta
    ) -> tuple[ApiKey, str, ApiKey]:
        """A successor key; the old one keeps working for `grace`, then expires."""
        now = self._clock.now()
        with store_errors():
            async with self._db.engine.begin() as conn:
                old = await self._get_key(conn, key_id)
                if not old.usable_at(now):
                    raise Conflict(
                        "Only a usable key can be rotated; this one is revoked or expired.",
                        code="key_not_usable",
                    )
                new, plaintext = await self._insert_key(
                    conn, old.tenant_id, old.name, now, old.expires_at
                )
                grace_end = now + grace
                if old.expires_at is not None:
                    grace_end = min(grace_end, old.expires_at)
                await conn.execute(
                    update(api_keys)
                    .where(api_keys.c.id == old.id)
                    .values(expires_at=grace_end, rotated_to=new.id)
                )
                await append_audit(
                    conn,
                    at=now,
                    actor=actor,
                    action="key.rotate",
                    target_type="api_key",
                    target_id=old.id,
                    tenant_id=old.tenant_id,
                    details={"new_key_id": new.id, "old_key_expires_at": _iso_or_none(grace_end)},
                )
                old = await self._get_key(conn, old.id)
        return new, plaintext, old

    async def grant_for(self, public_id: str) -> KeyGrant | None:
        """The key and its tenant, for authentication; None when there is no such key."""
        query = (
            select(api_keys, tenants)
            .join(tenants, tenants.c.id == api_keys.c.tenant_id)
            .where(api_keys.c.id == public_id)
        )
        with store_errors():
            async with self._db.engine.connect() as conn:
                row = (await conn.execute(query)).first()
        if row is None:
            return None
        mapping = row._mapping
        key = ApiKey(
            id=mapping[api_keys.c.id],
            tenant_id=mapping[api_keys.c.tenant_id],
            name=mapping[api_keys.c.name],
            created_at=mapping[api_keys.c.created_at],
            expires_at=mapping[api_keys.c.expires_at],
            revoked_at=mapping[api_keys.c.revoked_at],
            rotated_to=mapping[api_keys.c.rotated_to],
        )
        tenant = Tenant(
            id=mapping[tenants.c.id],
            name=mapping[tenants.c.name],
            status=mapping[tenants.c.status],
            models=tuple(mapping[tenants.c.models]),
            metadata=dict(mapping[tenants.c.metadata]),
            created_at=mapping[tenants.c.created_at],
            updated_at=mapping[tenants.c.updated_at],
            quotas=dict(mapping[tenants.c.quotas]),
            version=mapping[tenants.c.version],
        )
        return KeyGrant(key=key, secret_hash=mapping[api_keys.c.secret_hash], tenant=tenant)

    # -- helpers ---------------------------------------------------------------------------

    async def _get_tenant(
        self, conn: AsyncConnection, ref: str, *, for_update: bool = False
    ) -> Tenant:
        query = select(tenants).where(or_(tenants.c.id == ref, tenants.c.name == ref))
        if for_update:
            query = query.with_for_update()  # PostgreSQL; SQLite relies on the version check
        row = (await conn.execute(query)).first()
        if row is None:
            raise NotFound(f"No tenant '{ref}'.", code="tenant_not_found")
        return _tenant(row)

    async def _get_key(self, conn: AsyncConnection, key_id: str) -> ApiKey:
        row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).first()
        if row is None:
            raise NotFound(f"No API key '{key_id}'.", code="key_not_found")
        return _key(row)

    async def _insert_key(
        self,
        conn: AsyncConnection,
        tenant_id: str,
        name: str,
        now: datetime,
        expires_at: datetime | None,
    ) -> tuple[ApiKey, str]:
        generated = generate_key()
        await conn.execute(
            api_keys.insert().values(
                id=generated.public_id,
                tenant_id=tenant_id,
                name=name,
                secret_hash=generated.secret_hash,
                created_at=now,
                expires_at=expires_at,
            )
        )
        key = ApiKey(
            id=generated.public_id,
            tenant_id=tenant_id,
            name=name,
            created_at=now,
            expires_at=expires_at,
            revoked_at=None,
            rotated_to=None,
        )
        return key, generated.plaintext


def _tenant(row: Row[Any]) -> Tenant:
    return Tenant(
        id=row.id,
        name=row.name,
        status=row.status,
        models=tuple(row.models),
        metadata=dict(row.metadata),
        created_at=row.created_at,
        updated_at=row.updated_at,
        quotas=dict(row.quotas),
        version=row.version,
    )


def _key(row: Row[Any]) -> ApiKey:
    return ApiKey(
        id=row.id,
        tenant_id=row.tenant_id,
        name=row.name,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        rotated_to=row.rotated_to,
    )


def _iso_or_none(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()
