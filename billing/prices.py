"""The price book: EUR per million prompt and completion tokens and per request, per model,
with history: a price takes effect from a date (UTC) and the earlier ones are kept.

Amounts are kept in micro-euros (integers) wherever they are summed, so budgets and invoices
never drift by floating-point rounding. A request is charged the price in force when it is
metered; the ledger keeps that charge, so later changes never rewrite history.

A request that used no tokens costs nothing, `eur_per_request` included: it is one the engine
refused or never received (the gateway's billing policy, `gateway/proxy.py`). This one rule gives
the quota budget's settle, the ledger and the billing counters the same charge.
"""

from __future__ import annotations

import bisect
import math
from datetime import UTC, date, datetime

from pydantic import BaseModel, ConfigDict, Field

MICRO = 1_000_000


class ModelPrice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_eur_per_million: float = Field(default=0.0, ge=0)
    completion_eur_per_million: float = Field(default=0.0, ge=0)
    eur_per_request: float = Field(default=0.0, ge=0)

    def micro_eur(self, prompt_tokens: int, completion_tokens: int) -> int:
        """The price of one request in micro-euros, rounded up (never under-charged)."""
        if prompt_tokens == 0 and completion_tokens == 0:
            return 0  # nothing the engine did is billed (module docstring)
        # EUR per million tokens == micro-euros per token.
        total = (
            prompt_tokens * self.prompt_eur_per_million
            + completion_tokens * self.completion_eur_per_million
            + self.eur_per_request * MICRO
        )
        return math.ceil(round(total, 6))


class DatedPrice(ModelPrice):
    """A price in force from `from` (a date, UTC midnight) until the next one."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    effective_from: date = Field(alias="from")


def price_history(value: ModelPrice | list[DatedPrice]) -> list[DatedPrice]:
    if isinstance(value, list):
        return sorted(value, key=lambda price: price.effective_from)
    return [DatedPrice(**value.model_dump(), effective_from=date.min)]


def check_history(value: ModelPrice | list[DatedPrice]) -> ModelPrice | list[DatedPrice]:
    if isinstance(value, list):
        dates = [price.effective_from for price in value]
        if not dates:
            raise ValueError("a price history needs at least one entry")
        if len(set(dates)) != len(dates):
            raise ValueError("two prices take effect on the same date")
    return value


class PriceBook:
    def __init__(self, prices: dict[str, ModelPrice | list[DatedPrice]]) -> None:
        self._history = {model: price_history(value) for model, value in prices.items()}
        self._starts = {
            model: [p.effective_from for p in history] for model, history in self._history.items()
        }

    def price(self, model_id: str, at: datetime | None = None) -> ModelPrice:
        history = self._history.get(model_id)
        if not history:
            return ModelPrice()
        day = (at or datetime.now(UTC)).astimezone(UTC).date()
        index = bisect.bisect_right(self._starts[model_id], day) - 1
        return history[index] if index >= 0 else ModelPrice()

    def micro_eur(
        self, model_id: str, prompt_tokens: int, completion_tokens: int, at: datetime | None = None
    ) -> int:
        return self.price(model_id, at).micro_eur(prompt_tokens, completion_tokens)
