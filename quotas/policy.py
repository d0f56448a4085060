"""Quota policy: what a tenant may use. Unset means unlimited; 0 means blocked.

A tenant's effective policy is the defaults of `sluis.yaml` overlaid with its own settings, field
by field: a field the tenant sets wins, a field it leaves out follows the default, and
`"unlimited"` lifts a limit for that tenant whatever the default. Limits for one model
(`models: {tiny-chat: {...}}`) apply on top of the tenant-wide ones, and a tenant's settings for
a model overlay the default settings for that model the same way, field by field.

The admin API changes a tenant's settings with a JSON merge patch (RFC 7396, `patch_settings`):
`null` removes a field (back to the default), so "unlimited" needs a value of its own: the string
`"unlimited"`. Stored, an unlimited field is `None`, as it always was, so that gateways of an
older version read stored settings the same way.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

UNLIMITED = "unlimited"
LIMIT_FIELDS = (
    "requests_per_minute",
    "tokens_per_minute",
    "max_concurrent",
    "tokens_per_day",
    "tokens_per_month",
    "eur_per_month",
)
BUDGET_FIELDS = ("tokens_per_day", "tokens_per_month", "eur_per_month")


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    requests_per_minute: int | None = Field(default=None, ge=0)
    tokens_per_minute: int | None = Field(default=None, ge=0)
    max_concurrent: int | None = Field(default=None, ge=0)
    tokens_per_day: int | None = Field(default=None, ge=0)
    tokens_per_month: int | None = Field(default=None, ge=0)
    eur_per_month: float | None = Field(default=None, ge=0)

    def has_budget(self) -> bool:
        """A token or money budget among these fields (the tenant-wide ones, for a policy)."""
        return any(getattr(self, name) is not None for name in BUDGET_FIELDS)


class QuotaPolicy(Limits):
    models: dict[str, Limits] = Field(default_factory=dict)

    def for_model(self, model_id: str) -> Limits | None:
        return self.models.get(model_id)

    def has_any_budget(self) -> bool:
        """A budget tenant-wide or for any model: what the default fail mode protects."""
        return self.has_budget() or any(limits.has_budget() for limits in self.models.values())


def effective_policy(defaults: QuotaPolicy, settings: dict[str, Any]) -> QuotaPolicy:
    """The defaults overlaid, field by field, with a tenant's stored settings."""
    merged = defaults.model_dump()
    _overlay(merged, settings)
    models: dict[str, dict[str, Any]] = merged["models"]
    for model_id, own in (settings.get("models") or {}).items():
        models[model_id] = _overlay(dict(models.get(model_id) or {}), own or {})
    return QuotaPolicy.model_validate(merged)


def _overlay(target: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    for name in LIMIT_FIELDS:
        if name in settings:
            value = settings[name]
            target[name] = None if value is None or value == UNLIMITED else value
    return target


# -- a tenant's settings, as the admin API reads and writes them --------------------------------


def _whole(value: Any) -> Any:
    if value is None or value == UNLIMITED:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PydanticCustomError(
            "quota_value", 'must be a whole number of at least 0, or "unlimited"'
        )
    return value


def _amount(value: Any) -> Any:
    if value is None or value == UNLIMITED:
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise PydanticCustomError("quota_value", 'must be a number of at least 0, or "unlimited"')
    return value


Whole = Annotated[Any, AfterValidator(_whole)]
Amount = Annotated[Any, AfterValidator(_amount)]


class LimitSettings(BaseModel):
    """One scope of a tenant's settings in a request: a number, "unlimited", or null (remove)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    requests_per_minute: Whole = None
    tokens_per_minute: Whole = None
    max_concurrent: Whole = None
    tokens_per_day: Whole = None
    tokens_per_month: Whole = None
    eur_per_month: Amount = None


class QuotaSettings(LimitSettings):
    models: dict[str, LimitSettings | None] | None = None

    def as_patch(self) -> dict[str, Any]:
        """The fields the request named, nulls included: a merge patch."""
        return self.model_dump(exclude_unset=True)


def patch_settings(stored: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Stored settings with a merge patch (RFC 7396) applied; stored settings again."""
    merged = merge_patch(shown_settings(stored), patch)
    models = {model_id: own for model_id, own in (merged.pop("models", None) or {}).items() if own}
    if models:
        merged["models"] = models
    return _stored(merged)


def shown_settings(stored: dict[str, Any]) -> dict[str, Any]:
    """Stored settings as the admin API shows them: None (unlimited) spelled "unlimited"."""
    shown = {name: UNLIMITED if value is None else value for name, value in stored.items()}
    if "models" in stored:
        shown["models"] = {
            model_id: shown_settings(own or {})
            for model_id, own in (stored["models"] or {}).items()
        }
    return shown


def _stored(shown: dict[str, Any]) -> dict[str, Any]:
    stored = {name: None if value == UNLIMITED else value for name, value in shown.items()}
    if "models" in shown:
        stored["models"] = {model_id: _stored(own) for model_id, own in shown["models"].items()}
    return stored


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396: objects merge member by member, null removes a member, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), value)
    return result
