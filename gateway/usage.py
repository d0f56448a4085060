"""One usage record per request: who used which model, how many tokens, how it ended.

Never prompt or completion text. `request_id` makes writing it idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Literal

Outcome = Literal["ok", "error", "cancelled"]


@dataclass(frozen=True, slots=True)
class UsageRecord:
    request_id: str
    tenant_id: str
    key_id: str
    model: str
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    status: int
    outcome: Outcome
    usage_exact: bool
    ttft_ms: float | None
    duration_ms: float
    created_at: datetime
    # The gateway that metered it: each seeds its own counters from its own records.
    gateway_id: str = ""
    # The price book's charge for it, fixed when metered (a later price change never rewrites it).
    cost_micro_eur: int = 0

    def to_row(self) -> dict[str, Any]:
        # Not dataclasses.asdict: that deep-copies every field, a measurable cost per request.
        return {name: getattr(self, name) for name in _FIELDS}

    def to_json(self) -> dict[str, Any]:
        row = self.to_row()
        row["created_at"] = self.created_at.isoformat().replace("+00:00", "Z")
        row["total_tokens"] = self.prompt_tokens + self.completion_tokens
        row["cost_eur"] = self.cost_micro_eur / 1_000_000
        return row


_FIELDS = tuple(field.name for field in fields(UsageRecord))
