"""The price book: prices take effect from a date, earlier ones are kept, requests are charged
the price in force when they are metered."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import httpx
import pytest

from billing.prices import DatedPrice, ModelPrice, PriceBook
from gateway.clock import ManualClock
from gateway.settings import ConfigError, FileConfig, load_settings
from tests.conftest import GatewayFactory

HISTORY = [
    DatedPrice(
        effective_from=date(2026, 11, 1), prompt_eur_per_million=1, completion_eur_per_million=2
    ),
    DatedPrice(
        effective_from=date(2026, 12, 1),
        prompt_eur_per_million=10,
        completion_eur_per_million=20,
        eur_per_request=0.001,
    ),
]


def test_the_price_in_force_on_a_day() -> None:
    book = PriceBook({"tiny-chat": HISTORY, "flat": ModelPrice(prompt_eur_per_million=3)})
    november = datetime(2026, 11, 30, 23, 59, tzinfo=UTC)
    december = datetime(2026, 12, 1, 0, 0, tzinfo=UTC)
    assert book.micro_eur("tiny-chat", 1000, 1000, november) == 3000
    assert book.micro_eur("tiny-chat", 1000, 1000, december) == 30000 + 1000
    assert book.micro_eur("tiny-chat", 1000, 1000, datetime(2026, 10, 1, tzinfo=UTC)) == 0
    assert book.micro_eur("flat", 1000, 0, november) == 3000
    assert book.micro_eur("unpriced", 1000, 1000, november) == 0
    assert ModelPrice(prompt_eur_per_million=0.1).micro_eur(1, 0) == 1  # rounded up, never down


def test_the_per_request_price_needs_a_token() -> None:
    per_request = ModelPrice(eur_per_request=0.001)
    assert per_request.micro_eur(1, 0) == per_request.micro_eur(0, 1) == 1000
    assert per_request.micro_eur(0, 0) == 0  # refused or never sent: free, in budget and ledger


def test_a_history_in_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "sluis.yaml"
    config.write_text(
        "prices:\n  tiny-chat:\n    - {from: 2026-11-01, prompt_eur_per_million: 1}\n"
        "    - {from: 2026-12-01, prompt_eur_per_million: 2}\n"
    )
    history = load_settings(config).file.prices["tiny-chat"]
    assert isinstance(history, list) and [p.effective_from for p in history] == [
        date(2026, 11, 1),
        date(2026, 12, 1),
    ]
    config.write_text(
        "prices:\n  tiny-chat:\n    - {from: 2026-11-01, prompt_eur_per_million: 1}\n"
        "    - {from: 2026-11-01, prompt_eur_per_million: 2}\n"
    )
    with pytest.raises(ConfigError, match="same date"):
        load_settings(config)


def test_requests_are_charged_the_price_in_force_when_metered(
    gateway_factory: GatewayFactory,
) -> None:
    clock = ManualClock(datetime(2026, 11, 30, 23, 0, tzinfo=UTC))
    gateway = gateway_factory(clock=clock, file=FileConfig(prices={"fake-chat": HISTORY}))
    key = gateway.create_tenant("acme")
    body = {"model": "fake-chat", "max_tokens": 4, "messages": [{"role": "user", "content": "a b"}]}
    headers = {"authorization": f"Bearer {key}"}
    assert (
        httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers).status_code
        == 200
    )
    clock.advance(3600)  # into December: the new price applies from its first second
    assert (
        httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers).status_code
        == 200
    )
    costs = sorted(r["cost_micro_eur"] for r in gateway.records())
    assert costs == [2 * 1 + 4 * 2, 2 * 10 + 4 * 20 + 1000]
