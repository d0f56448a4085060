"""Invoices from Prometheus: per tenant and model, what its counters of the period hold.

Every billing counter carries the period its requests were metered in (`period="2026-11"`, the
UTC month, from the same clock reading as the ledger's record), and a gateway keeps exporting a
period's series through the next period. So a period's usage is the last value of its own
series, summed over gateways: exact at the boundaries, whenever the scrapes fall, as long as
Prometheus scraped each gateway once after its last request of the period (it has the whole next
period to do so). The series never reset (each restart starts them from the gateway's ledger
records), so a restart loses nothing. The series carry the gateway id (`gateway`) whose records
they start from, so each id's latest value is taken (`max` over the scrape `instance`s it was
seen at: a restart at a new address is not counted twice) and the ids are summed (a restart
under a new id starts a series of its own; the old id keeps its last value). Series from before
the `gateway` label are summed per `instance`, as they were, unless a labelled series of the same
`instance` follows them (the same gateway, upgraded in place). Money is read from
`sluis_cost_micro_eur_total`, the price charged when each request was metered, so a price change
mid-period is billed as it applied.
`--reconcile` compares with the ledger and reports scrape gaps and lost series.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from billing.periods import next_month_start
from billing.prometheus import BillingError, PrometheusReader

# Looking back this far before the period's start too, for a clock that ran a little behind.
MARGIN_S = 3600
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
        end = next_month_start(start)
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
    # Each series' last sample since the period began is its final value (or its value now).
    lookback = f"{round((now - period.start).total_seconds()) + MARGIN_S}s"
    selector = f'period="{period.name}"' + (f', tenant="{tenant}"' if tenant else "")

    def last(by: str, metric: str, own: str = "") -> dict[tuple[str, ...], float]:
        """Per gateway id its latest value, summed by `by` (`own`: the metric's other labels,
        such as a status class, whose series add up)."""
        labelled = f'last_over_time({metric}{{{selector}, gateway!=""}}[{lookback}])'
        # Series from before the `gateway` label, summed per `instance` as they used to be;
        # where a labelled series of the same instance follows one (a gateway upgraded in
        # place, its counters seeded from the same records) only the labelled one counts.
        # They keep `instance`, which `max by` drops: no label set is on both sides of `or`.
        unlabelled = (
            f'last_over_time({metric}{{{selector}, gateway=""}}[{lookback}])'
            f" unless on (instance, {by}{own}) {labelled}"
        )
        expression = f"sum by ({by}) (max by (gateway, {by}{own}) ({labelled}) or ({unlabelled}))"
        return reader.vector(expression, now)

    tokens = last("kind, model, tenant", "sluis_tokens_total")
    requests = last("model, tenant", "sluis_requests_total", ", status")
    money = last("model, tenant", "sluis_cost_micro_eur_total")
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
