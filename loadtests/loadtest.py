"""`make loadtest`: the Locust scenarios, headless, for a set time, then the report.

Against a running gateway (`--url` and `--admin-token`, or `SLUIS_URL` / `SLUIS_ADMIN_TOKEN`),
or, without them, against a stack this command starts with `sluis up` and stops afterwards.
Writes Locust's CSV and HTML, `requests.jsonl` and `stream_latency.csv` (TTFT and TPOT per
tenant, measured on the stream) and PNG charts into `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loadtests import charts
from loadtests.load_records import read_latency, read_records
from loadtests.processes import SluisUp

SCENARIOS = Path(__file__).resolve().parent / "scenarios.py"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Target:
    url: str
    admin_token: str


@contextlib.contextmanager
def target(url: str | None, admin_token: str | None, config: Path) -> Iterator[Target]:
    if url:
        if not admin_token:
            raise SystemExit("loadtest: --admin-token (or SLUIS_ADMIN_TOKEN) is needed with --url")
        yield Target(url.rstrip("/"), admin_token)
        return
    with tempfile.TemporaryDirectory(prefix="sluis-loadtest-") as workdir:
        print("loadtest: starting the stack (sluis up) ...", flush=True)
        up = SluisUp(Path(workdir), config=config)
        try:
            up.wait_ready(timeout=900)
            yield Target(up.url, up.admin_token)
        finally:
            code = up.stop()
            print(f"loadtest: stack stopped (exit {code})", flush=True)


def run_locust(
    goal: Target, out: Path, *, users: int, spawn_rate: float, run_time: str, run_id: str
) -> int:
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "locust", "-f", str(SCENARIOS), "--headless",
        "--host", goal.url, "--users", str(users), "--spawn-rate", str(spawn_rate),
        "--run-time", run_time, "--stop-timeout", "30",
        "--csv", str(out / "locust"), "--csv-full-history", "--html", str(out / "locust.html"),
        "--only-summary", "--sluis-out", str(out), "--sluis-run-id", run_id,
    ]  # fmt: skip
    env = {**os.environ, "SLUIS_ADMIN_TOKEN": goal.admin_token}
    with (out / "locust.log").open("wb") as log:
        return subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def report(out: Path) -> str:
    """Charts into `out`, and a text summary per tenant."""
    records = read_records(out)
    charts.history_chart(out / "locust_stats_history.csv", out / "locust_history.png")
    charts.outcome_chart(records, out / "outcomes.png")
    timings = read_latency(out)
    if timings:
        charts.stream_latency_chart(timings, out / "stream_latency.png")
    statuses = Counter((str(r["tenant"]), int(str(r["status"]))) for r in records)
    tokens: Counter[str] = Counter()
    for record in records:
        tokens[str(record["tenant"])] += int(str(record["completion_tokens"]))
    lines = [
        f"{'tenant':<8} {'requests':>8} {'200':>6} {'429':>6} {'other':>6} {'out tokens':>10} "
        f"{'TTFT p50':>9} {'TTFT p95':>9} {'TPOT p50':>9} {'TPOT p95':>9}"
    ]
    by_tenant = {row.tenant: row for row in timings}
    for tenant in sorted({t for t, _ in statuses}):
        total = sum(n for (t, _), n in statuses.items() if t == tenant)
        ok, limited = statuses[(tenant, 200)], statuses[(tenant, 429)]
        row = by_tenant.get(tenant)
        times = (
            f"{_ms(row.ttft_p50_s)} {_ms(row.ttft_p95_s)} {_ms(row.tpot_p50_s)} "
            f"{_ms(row.tpot_p95_s)}"
            if row
            else f"{'-':>9} {'-':>9} {'-':>9} {'-':>9}"
        )
        lines.append(
            f"{tenant:<8} {total:>8} {ok:>6} {limited:>6} {total - ok - limited:>6} "
            f"{tokens[tenant]:>10} {times}"
        )
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return f"{'-':>9}" if seconds is None else f"{seconds * 1000:>7.1f}ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.loadtest", description=__doc__)
    parser.add_argument("--url", default=os.environ.get("SLUIS_URL"))
    parser.add_argument("--admin-token", default=os.environ.get("SLUIS_ADMIN_TOKEN"))
    parser.add_argument("--config", type=Path, default=REPO / "sluis.yaml")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--spawn-rate", type=float, default=4)
    parser.add_argument("--run-time", default="60s", help="Locust's form: 30s, 5m, 1h")
    parser.add_argument("--out", type=Path, default=Path("loadtest-out"))
    args = parser.parse_args(argv)
    run_id = time.strftime("%m%d%H%M%S")
    with target(args.url, args.admin_token, args.config) as goal:
        code = run_locust(
            goal,
            args.out,
            users=args.users,
            spawn_rate=args.spawn_rate,
            run_time=args.run_time,
            run_id=run_id,
        )
    if not (args.out / "requests.jsonl").exists():
        log = (args.out / "locust.log").read_text()[-3000:]
        print(f"loadtest: Locust wrote no records (exit {code}); its log ends:\n{log}")
        return code or 1
    print(report(args.out))
    print(f"\nwritten to {args.out}/: locust_stats.csv, locust_stats_history.csv, locust.html,")
    print(
        "requests.jsonl, stream_latency.csv, locust_history.png, outcomes.png, stream_latency.png"
    )
    if code != 0:
        print(f"locust exited with {code} (failures: see {args.out}/locust_failures.csv)")
    return code


if __name__ == "__main__":
    sys.exit(main())
