"""What a Locust run records beside Locust's own statistics: every request as the client saw it
(`requests.jsonl`) and stream timings per tenant (`stream_latency.csv`)."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadtests.httpload import Sample

REQUESTS_FILE = "requests.jsonl"
LATENCY_FILE = "stream_latency.csv"


@dataclass
class RequestRecord:
    tenant: str  # the scenario's role: startup, agency, batch, noisy
    scenario: str
    status: int
    request_id: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    complete: bool = False  # a stream that ended with [DONE]


@dataclass(frozen=True)
class StreamTiming:
    tenant: str
    ttft_s: float
    tpot_s: float | None


@dataclass
class Run:
    run_id: str
    out: Path
    tenants: dict[str, tuple[str, str]] = field(default_factory=dict)  # role -> (name, key)
    records: list[RequestRecord] = field(default_factory=list)
    timings: list[StreamTiming] = field(default_factory=list)


@dataclass(frozen=True)
class TenantLatency:
    tenant: str
    streams: int
    ttft_p50_s: float
    ttft_p95_s: float
    tpot_p50_s: float | None
    tpot_p95_s: float | None


def latency_by_tenant(timings: list[StreamTiming]) -> list[TenantLatency]:
    grouped: dict[str, list[StreamTiming]] = defaultdict(list)
    for timing in timings:
        grouped[timing.tenant].append(timing)
    summary = []
    for tenant, group in sorted(grouped.items()):
        ttft = [t.ttft_s for t in group]
        tpot = [t.tpot_s for t in group if t.tpot_s is not None]
        summary.append(
            TenantLatency(
                tenant,
                len(group),
                Sample(latencies=ttft).percentile(50),
                Sample(latencies=ttft).percentile(95),
                Sample(latencies=tpot).percentile(50) if tpot else None,
                Sample(latencies=tpot).percentile(95) if tpot else None,
            )
        )
    return summary


def write_run(run: Run) -> None:
    run.out.mkdir(parents=True, exist_ok=True)
    with (run.out / REQUESTS_FILE).open("w") as out:
        for record in run.records:
            name = run.tenants.get(record.tenant, ("", ""))[0]
            out.write(json.dumps({**asdict(record), "tenant_name": name}) + "\n")
    with (run.out / LATENCY_FILE).open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(
            ["tenant", "streams", "ttft_p50_s", "ttft_p95_s", "tpot_p50_s", "tpot_p95_s"]
        )
        for row in latency_by_tenant(run.timings):
            writer.writerow(asdict(row).values())


def read_records(out: Path) -> list[dict[str, object]]:
    lines = (out / REQUESTS_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines if line]


def read_latency(out: Path) -> list[TenantLatency]:
    def number(text: str) -> float | None:
        return float(text) if text not in ("", "None") else None

    with (out / LATENCY_FILE).open() as source:
        return [
            TenantLatency(
                row["tenant"],
                int(row["streams"]),
                float(row["ttft_p50_s"]),
                float(row["ttft_p95_s"]),
                number(row["tpot_p50_s"]),
                number(row["tpot_p95_s"]),
            )
            for row in csv.DictReader(source)
        ]
