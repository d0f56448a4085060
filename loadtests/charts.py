"""PNG charts of a load test: Locust's history, outcomes and stream latency per tenant."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt

from loadtests.load_records import TenantLatency


def history_chart(history_csv: Path, png: Path) -> None:
    """Requests/s and response time p50/p95 (all requests) over the run, from Locust's CSV."""
    rows = [r for r in csv.DictReader(history_csv.open()) if r["Name"] == "Aggregated"]
    if not rows:
        raise ValueError(f"{history_csv}: no aggregated rows")
    start = int(rows[0]["Timestamp"])
    seconds = [int(r["Timestamp"]) - start for r in rows]
    figure, (rate, latency) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    rate.plot(seconds, [float(r["Requests/s"]) for r in rows], label="requests/s")
    rate.plot(seconds, [float(r["Failures/s"]) for r in rows], label="failures/s")
    rate.set_ylabel("per second")
    rate.legend()
    for column in ("50%", "95%"):
        values = [_number(r[column]) for r in rows]
        latency.plot(seconds, values, label=f"response time {column}")
    latency.set_ylabel("ms (whole answer)")
    latency.set_xlabel("seconds into the run")
    latency.legend()
    figure.suptitle("Sluis load test: all tenants")
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)


def outcome_chart(records: list[dict[str, object]], png: Path) -> None:
    """Answers per tenant by status: the noisy neighbour's 429s next to everyone's 200s."""
    counts = Counter((str(r["tenant"]), int(str(r["status"]))) for r in records)
    tenants = sorted({tenant for tenant, _ in counts})
    statuses = sorted({status for _, status in counts})
    figure, axes = plt.subplots(figsize=(8, 4.5))
    bottom = [0] * len(tenants)
    for status in statuses:
        heights = [counts[(tenant, status)] for tenant in tenants]
        axes.bar(tenants, heights, bottom=bottom, label=str(status))
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    axes.set_ylabel("requests")
    axes.set_title("Answers per tenant, by status")
    axes.legend(title="status")
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)


def stream_latency_chart(latency: list[TenantLatency], png: Path) -> None:
    """Time to first token and time per output token, p50 and p95, per tenant."""
    tenants = [row.tenant for row in latency]
    positions = range(len(tenants))
    figure, (ttft, tpot) = plt.subplots(1, 2, figsize=(10, 4.5))
    width = 0.38
    for axes, values, title in (
        (ttft, [(r.ttft_p50_s, r.ttft_p95_s) for r in latency], "time to first token"),
        (tpot, [(r.tpot_p50_s or 0, r.tpot_p95_s or 0) for r in latency], "time per output token"),
    ):
        axes.bar(
            [p - width / 2 for p in positions], [v[0] * 1000 for v in values], width, label="p50"
        )
        axes.bar(
            [p + width / 2 for p in positions], [v[1] * 1000 for v in values], width, label="p95"
        )
        axes.set_xticks(list(positions), tenants)
        axes.set_ylabel("ms")
        axes.set_title(title)
        axes.legend()
    figure.suptitle("Measured on the stream, per tenant")
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # Locust writes "N/A" before the first request ends
        return float("nan")
