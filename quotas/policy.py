"""Quota policy: what a tenant may use. Unset means unlimited; 0 means blocked.

A tenant's effective policy is the defaults of `sluis.yaml` overlaid with its own quotas
(a field the tenant sets to null is unlimited for it, whatever the default); limits for one
model (`models: {tiny-chat: {...}}`) apply on top of the tenant-wide ones.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

LIMIT_FIELDS = (
    "requests_per_minute",
    "tokens_per_minute",
    "max_concurrent",
    "tokens_per_day",
    "tokens_per_month",
    "eur_per_month",
)


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    requests_per_minute: int | None = Field(default=None, ge=0)
    tokens_per_minute: int | None = Field(default=None, ge=0)
    max_concurrent: int | None = Field(default=None, ge=0)
    tokens_per_day: int | None = Field(default=None, ge=0)
    tokens_per_month: int | None = Field(default=None, ge=0)
    eur_per_month: float | None = Field(default=None, ge=0)

    def has_budget(self) -> bool:
        return any(
            value is not None
            for value in (self.tokens_per_day, self.tokens_per_month, self.eur_per_month)
        )


class QuotaPolicy(Limits):
    models: dict[str, Limits] = Field(default_factory=dict)

    def for_model(self, model_id: str) -> Limits | None:
        return self.models.get(model_id)


def effective_policy(defaults: QuotaPolicy, overrides: dict[str, Any]) -> QuotaPolicy:
    """Defaults overlaid with a tenant's stored quotas (fields it names win, null included)."""
    merged = defaults.model_dump()
    for name in LIMIT_FIELDS:
        if name in overrides:
            merged[name] = overrides[name]
    models = dict(merged.get("models") or {})
    models.update(overrides.get("models") or {})
    merged["models"] = models
    return QuotaPolicy.model_validate(merged)
