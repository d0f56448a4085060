"""Reconciliation: the invoice (from Prometheus) against the ledger, and the scrape gaps.

Prometheus is lossy by design; the ledger is not. Any difference per tenant, model and field is
printed; so is every tenant and model the ledger has usage for and Prometheus has no series of at
all (a lost series: e.g. a gateway nobody scrapes), and every stretch of the period in which
Prometheus holds no scrape of a gateway (with `up` sampled per minute): billing never goes
silently short.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from billing.invoice import Invoice
from billing.prometheus import PrometheusReader

FIELDS = ("prompt_tokens", "completion_tokens", "requests", "amount_eur")
GAP_STEP_S = 60.0
MAX_POINTS = 10_000


@dataclass(frozen=True, slots=True)
class Difference:
    tenant: str
    model: str
    field: str
    prometheus: float
    ledger: float


@dataclass(frozen=True, slots=True)
class Gap:
    target: str
    start: str
    end: str


@dataclass(frozen=True, slots=True)
class LostSeries:
    tenant: str
    model: str


@dataclass(frozen=True, slots=True)
class Reconciliation:
    differences: tuple[Difference, ...]
    gaps: tuple[Gap, ...]
    lost: tuple[LostSeries, ...] = ()

    @property
    def clean(self) -> bool:
        return not self.differences and not self.gaps and not self.lost

    def to_json(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "differences": [asdict(d) for d in self.differences],
            "lost_series": [asdict(s) for s in self.lost],
            "gaps": [asdict(g) for g in self.gaps],
        }


def reconcile(
    invoice: Invoice,
    ledger: list[dict[str, Any]],
    reader: PrometheusReader,
    *,
    gap_step_s: float = GAP_STEP_S,
) -> Reconciliation:
    billed = {(line.tenant, line.model): asdict(line) for line in invoice.lines}
    recorded = {
        (row["tenant"], row["model"]): {
            "prompt_tokens": row["prompt_tokens"],
            "completion_tokens": row["completion_tokens"],
            "requests": row["requests"],
            "amount_eur": row.get("cost_eur", 0.0),
        }
        for row in ledger
    }
    differences = []
    for key in sorted(billed.keys() | recorded.keys()):
        ours, theirs = billed.get(key, {}), recorded.get(key, {})
        for field in FIELDS:
            a, b = float(ours.get(field, 0)), float(theirs.get(field, 0))
            if abs(a - b) > 1e-9:
                differences.append(Difference(key[0], key[1], field, a, b))
    lost = tuple(
        LostSeries(*key)
        for key in sorted(recorded.keys() - billed.keys())
        if any(recorded[key][field] for field in FIELDS)
    )
    gaps = tuple(scrape_gaps(reader, invoice, gap_step_s))
    return Reconciliation(tuple(differences), gaps, lost)


def scrape_gaps(reader: PrometheusReader, invoice: Invoice, step_s: float) -> list[Gap]:
    """Stretches of `step_s` or more, between a target's first and last scrape in the period,
    with no scrape of it. Prometheus answers at most 11,000 points a query: a coarse pass finds
    where the data begins, then the fine pass walks from there in chunks."""
    span = (invoice.end - invoice.start).total_seconds()
    coarse = max(step_s, span / MAX_POINTS)
    # Evaluation points fall at start + k * step: start where the last one is the period's end.
    aligned = invoice.end.timestamp() - math.ceil(span / coarse) * coarse
    found = _scrape_times(reader, _at(aligned), invoice.end, coarse)
    if not found:
        return []
    first = max(invoice.start.timestamp(), min(min(t) for t in found.values()) - coarse)
    stamps: dict[str, list[float]] = {}
    chunk_end = invoice.end.timestamp()
    while chunk_end > first:  # backwards from the end, so that every chunk ends on a point
        points = min(MAX_POINTS, math.ceil((chunk_end - first) / step_s))
        chunk_start = chunk_end - points * step_s
        for target, times in _scrape_times(
            reader, _at(chunk_start), _at(chunk_end), step_s
        ).items():
            stamps.setdefault(target, []).extend(times)
        chunk_end = chunk_start - step_s
    gaps = []
    for target, times in sorted(stamps.items()):
        ordered = sorted(set(times))
        for before, after in itertools.pairwise(ordered):
            if after - before > step_s * 1.5:
                gaps.append(Gap(target, _iso(before), _iso(after - step_s)))
    return gaps


def _scrape_times(
    reader: PrometheusReader, start: datetime, end: datetime, step_s: float
) -> dict[str, list[float]]:
    window = f"{round(step_s * 1000)}ms"
    series = reader.matrix(f'count_over_time(up{{job=~".+"}}[{window}])', start, end, step_s)
    return {dict(labels).get("instance", "?"): times for labels, times in series.items()}


def _at(stamp: float) -> datetime:
    return datetime.fromtimestamp(stamp, UTC)


def _iso(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).isoformat()
