"""What the tenancy store hands out: plain frozen values, never rows or sessions."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from gateway.keys import display_prefix
from quotas.policy import shown_settings

TenantStatus = Literal["active", "suspended"]
ALL_MODELS = "*"


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    name: str
    status: TenantStatus
    models: tuple[str, ...]
    metadata: dict[str, Any] = field(hash=False)
    created_at: datetime
    updated_at: datetime
    # The tenant's own quota settings, overlaid on the defaults (see quotas/policy.py).
    quotas: dict[str, Any] = field(default_factory=dict, hash=False)
    # Raised by one in every update, so two updates never share it (the admin API's ETag).
    version: int = 1

    def allows(self, model_id: str) -> bool:
        return ALL_MODELS in self.models or model_id in self.models

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "tenant",
            "name": self.name,
            "status": self.status,
            "models": list(self.models),
            "metadata": self.metadata,
            "quotas": shown_settings(self.quotas),
            "version": self.version,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
        }

    @property
    def etag(self) -> str:
        return f'"{self.version}"'


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    tenant_id: str
    name: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    rotated_to: str | None

    @property
    def prefix(self) -> str:
        return display_prefix(self.id)

    def usable_at(self, now: datetime) -> bool:
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or now < self.expires_at

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "api_key",
            "tenant_id": self.tenant_id,
            "name": self.name,
            "prefix": self.prefix,
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
            "revoked_at": _iso(self.revoked_at),
            "rotated_to": self.rotated_to,
        }


@dataclass(frozen=True, slots=True)
class KeyGrant:
    """Everything authentication needs about one key, read in one query."""

    key: ApiKey
    secret_hash: str
    tenant: Tenant


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    action: str
    target_type: str
    target_id: str
    tenant_id: str | None
    details: dict[str, Any] = field(hash=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "audit_entry",
            "at": _iso(self.at),
            "actor": self.actor,
            "action": self.action,
            "target_type": self.target_type,
            "target_id": self.target_id,
            "tenant_id": self.tenant_id,
            "details": self.details,
        }
