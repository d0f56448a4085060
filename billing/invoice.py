"""Invoices from Prometheus: per tenant and model, what its counters grew by over the period.

The gateways' counters never reset (each restart starts from its own ledger records), so the
growth is the value at the period's end minus the value at its start, summed over gateways; the
money is read from `sluis_cost_micro_eur_total`, the price charged when each request was metered,
so a price change in the middle of a period is billed as it applied. A boundary falls between two
scrapes: usage of the last scrape interval before it lands in the next period (1 s with the
shipped scrape config); `--reconcile` against the ledger shows any difference.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from billing.prometheus import BillingError, PrometheusReader

LOOKBACK = "35d"
_PERIOD = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")


@dataclass(frozen=True, slots=True)
class Period:
    name: str
    start: datetime
    end: datetime

    @classmethod
    def parse(cls, text: str, *, now: datetime) -> Period:
        match = _PERIOD.match(text)
        if match is None:
            raise BillingError(
                f"--period must be YYYY-MM (e.g. 2026-11), not {text!r}", exit_code=2
            )
        year, month = int(match.group(1)), int(match.group(2))
        start = datetime(year, month, 1, tzinfo=UTC)
        end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
        if start > now:
            raise BillingError(f"the period {text} has not begun yet", exit_code=2)
        return cls(text, start, end)

    def closed(self, now: datetime) -> bool:
        return self.end <= now


@dataclass(frozen=True, slots=True)
class InvoiceLine:
    tenant: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    requests: int
    amount_eur: float


@dataclass(frozen=True, slots=True)
class Invoice:
    period: str
    start: datetime
    end: datetime
    final: bool
    lines: tuple[InvoiceLine, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "period": self.period,
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "final": self.final,
            "lines": [asdict(line) for line in self.lines],
            "total_eur": round(sum(line.amount_eur for line in self.lines), 6),
        }


def build_invoice(
    reader: PrometheusReader, period: Period, *, now: datetime, tenant: str | None = None
) -> Invoice:
    end = min(period.end, now)
    selector = f'{{tenant="{tenant}"}}' if tenant else ""
    tokens = _growth(
        reader, _last("kind, model, tenant", "sluis_tokens_total", selector), period.start, end
    )
    requests = _growth(
        reader, _last("model, tenant", "sluis_requests_total", selector), period.start, end
    )
    money = _growth(
        reader, _last("model, tenant", "sluis_cost_micro_eur_total", selector), period.start, end
    )
    keys = sorted({(t, m) for (_, m, t) in tokens} | {(t, m) for (m, t) in requests})
    lines = tuple(
        InvoiceLine(
            tenant=t,
            model=m,
            prompt_tokens=round(tokens.get(("prompt", m, t), 0)),
            completion_tokens=round(tokens.get(("completion", m, t), 0)),
            requests=round(requests.get((m, t), 0)),
            amount_eur=round(money.get((m, t), 0)) / 1_000_000,
        )
        for t, m in keys
    )
    return Invoice(period.name, period.start, end, period.closed(now), lines)


def _last(by: str, metric: str, selector: str) -> str:
    # The last sample at or before the instant, looking back far enough to bridge a gateway
    # that was down across the boundary (an absent series would otherwise count from zero).
    return f"sum by ({by}) (last_over_time({metric}{selector}[{LOOKBACK}]))"


def _growth(
    reader: PrometheusReader, expression: str, start: datetime, end: datetime
) -> dict[tuple[str, ...], float]:
    before = reader.vector(expression, start)
    after = reader.vector(expression, end)
    return {labels: value - before.get(labels, 0.0) for labels, value in after.items()}
