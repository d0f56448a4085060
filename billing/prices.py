"""The price book: EUR per million prompt and completion tokens and per request, per model.

Amounts are kept in micro-euros (integers) wherever they are summed, so budgets and invoices
never drift by floating-point rounding.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

MICRO = 1_000_000


class ModelPrice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_eur_per_million: float = Field(default=0.0, ge=0)
    completion_eur_per_million: float = Field(default=0.0, ge=0)
    eur_per_request: float = Field(default=0.0, ge=0)

    def micro_eur(self, prompt_tokens: int, completion_tokens: int) -> int:
        """The price of one request in micro-euros, rounded up (never under-charged)."""
        # EUR per million tokens == micro-euros per token.
        total = (
            prompt_tokens * self.prompt_eur_per_million
            + completion_tokens * self.completion_eur_per_million
            + self.eur_per_request * MICRO
        )
        return math.ceil(round(total, 6))


class PriceBook:
    def __init__(self, prices: dict[str, ModelPrice]) -> None:
        self._prices = prices

    def price(self, model_id: str) -> ModelPrice:
        return self._prices.get(model_id, ModelPrice())

    def micro_eur(self, model_id: str, prompt_tokens: int, completion_tokens: int) -> int:
        return self.price(model_id).micro_eur(prompt_tokens, completion_tokens)
