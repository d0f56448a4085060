"""`make loadtest`'s runner, briefly, against the real stack: the four tenant scenarios run,
Locust's CSV and HTML, the per-tenant stream timings and the charts are written, and every
request the clients recorded is in the ledger with the tokens they saw (and nothing else is)."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from loadtests.load_records import read_latency, read_records
from tests.deployments.conftest import RealStack

pytestmark = pytest.mark.real_stack

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def load_run(real_stack: RealStack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("loadtest")
    command = [
        sys.executable, "-m", "loadtests.loadtest", "--url", real_stack.url,
        "--admin-token", real_stack.up.admin_token, "--users", "7", "--spawn-rate", "7",
        "--run-time", "20s", "--out", str(out),
    ]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    (out / "report.txt").write_text(finished.stdout)
    return out


def _ledger(stack: RealStack, tenant: str, expected: int) -> list[dict[str, Any]]:
    """The tenant's usage records, once metering has written as many as expected."""
    deadline = time.monotonic() + 20
    while True:
        response = stack.admin("GET", "/usage/records", params={"tenant": tenant, "limit": "10000"})
        assert response.status_code == 200, response.text
        records: list[dict[str, Any]] = response.json()["data"]
        if len(records) >= expected or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def test_the_run_writes_locust_reports_stream_timings_and_charts(load_run: Path) -> None:
    for name in ("locust_stats.csv", "locust_stats_history.csv", "locust.html", "requests.jsonl"):
        assert (load_run / name).stat().st_size > 0, name
    for chart in ("locust_history.png", "outcomes.png", "stream_latency.png"):
        assert (load_run / chart).read_bytes().startswith(PNG), chart
    latency = {row.tenant: row for row in read_latency(load_run)}
    assert {"startup", "agency", "batch"} <= set(latency)  # the streaming tenants
    for row in latency.values():
        assert row.streams > 0 and 0 < row.ttft_p50_s <= row.ttft_p95_s
        assert row.tpot_p50_s is not None and row.tpot_p50_s > 0
    report = (load_run / "report.txt").read_text()
    assert "TTFT p95" in report and "noisy" in report


def test_locust_statistics_count_the_same_requests_as_the_clients_recorded(
    load_run: Path,
) -> None:
    recorded = Counter(str(r["scenario"]) for r in read_records(load_run))
    with (load_run / "locust_stats.csv").open() as source:
        stats = {row["Name"]: row for row in csv.DictReader(source)}
    for scenario, count in recorded.items():
        assert int(stats[scenario]["Request Count"]) == count, scenario
        assert int(stats[scenario]["Failure Count"]) == 0, scenario
    assert set(recorded) == {
        "startup chat stream", "agency embeddings", "agency chat stream",
        "batch completion stream", "noisy chat",
    }  # fmt: skip


def test_the_noisy_neighbour_is_held_to_its_quota(load_run: Path) -> None:
    noisy = Counter(int(str(r["status"])) for r in read_records(load_run) if r["tenant"] == "noisy")
    assert noisy[429] > noisy[200] > 0
    assert noisy[200] <= 20  # its requests_per_minute, and the run is shorter than a minute
    assert set(noisy) == {200, 429}


def test_every_recorded_request_is_in_the_ledger_with_the_tokens_the_client_saw(
    real_stack: RealStack, load_run: Path
) -> None:
    records = read_records(load_run)
    for tenant in sorted({str(r["tenant_name"]) for r in records}):
        mine = [r for r in records if r["tenant_name"] == tenant]
        admitted = {str(r["request_id"]): r for r in mine if r["status"] == 200}
        ledger = {r["request_id"]: r for r in _ledger(real_stack, tenant, len(admitted))}
        # Exactly the admitted requests: refused ones (429) leave no usage behind.
        assert set(ledger) == set(admitted), tenant
        for request_id, seen in admitted.items():
            booked = ledger[request_id]
            assert (booked["prompt_tokens"], booked["completion_tokens"]) == (
                seen["prompt_tokens"],
                seen["completion_tokens"],
            ), request_id
            assert booked["status"] == 200 and booked["usage_exact"]
        streams = [r for r in admitted.values() if "stream" in str(r["scenario"])]
        assert all(r["complete"] for r in streams)  # every stream ended with [DONE]
