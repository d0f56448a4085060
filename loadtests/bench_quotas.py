"""`make bench-quotas`: what exact quotas on Redis cost, in one run.

One `sluis gateway` (core 1) with `SLUIS_REDIS_URL` set, with allowances (quotas/allowances.py)
and without; Redis, the fake upstream and this load
generator on core 0. Two tenants on that same gateway: one without quotas (no store call) and one
with every limit set, none of them reached (six checks in one Lua call per admission and one per
reconciliation). Their latency at concurrency 1 is measured in alternating rounds, so drift hits
both alike. Then the rejection path: a tenant over its limit, hammered at concurrency 32.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from gateway.serve import run_async as run_loop
from loadtests.bench_gateway import (
    BENCH_QUOTAS,
    start_sluis_process,
    start_upstream,
    tenant_target,
)
from loadtests.httpload import Sample, closed_loop
from loadtests.processes import Process, free_port, pinned


def start_redis(workdir: Path) -> tuple[Process, str]:
    port = free_port()
    process = Process(
        "redis",
        pinned(
            [
                "redis-server",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            "0",
        ),
        log=workdir / "redis.log",
    )
    process.wait_port(port)
    return process, f"redis://127.0.0.1:{port}/0"


def merge(samples: list[Sample]) -> Sample:
    merged = Sample()
    for sample in samples:
        merged.latencies += sample.latencies
        merged.errors += sample.errors
        merged.elapsed += sample.elapsed
    return merged


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


async def measure(url: str, *, rounds: int, per_round: int) -> dict[str, Sample]:
    off = tenant_target(url, "quotas-off")
    on = tenant_target(url, "quotas-on", BENCH_QUOTAS)
    blocked = tenant_target(url, "over-quota", {"requests_per_minute": 1})
    for target in (off, on):
        await closed_loop(target, requests=300)
    samples: dict[str, list[Sample]] = {"off": [], "on": []}
    for _ in range(rounds):
        samples["off"].append(await closed_loop(off, requests=per_round))
        samples["on"].append(await closed_loop(on, requests=per_round))
    await closed_loop(blocked, requests=1)  # uses up its one request a minute
    rejections = await closed_loop(blocked, seconds=5, concurrency=32, ok_status=429)
    return {"off": merge(samples["off"]), "on": merge(samples["on"]), "rejections": rejections}


def report(name: str, results: dict[str, Sample]) -> None:
    off, on, rejections = results["off"], results["on"], results["rejections"]
    print(f"\n{name}\n| quotas | p50 ms | p99 ms | errors |\n|---|---|---|---|")
    for label, sample in (("off", off), ("on (6 limits)", on)):
        print(
            f"| {label} | {ms(sample.percentile(50))} | {ms(sample.percentile(99))} | "
            f"{sample.errors} |"
        )
    print(
        f"added by quotas: p50 {ms(on.percentile(50) - off.percentile(50))} ms, "
        f"p99 {ms(on.percentile(99) - off.percentile(99))} ms"
    )
    print(
        f"rejection path: {rejections.throughput:.0f} rejections/s on one core "
        f"(429s, concurrency 32, {rejections.errors} other answers)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=300)
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {0})
    workdir = Path(tempfile.mkdtemp(prefix="sluis-bench-quotas-"))
    print(f"bench-quotas: logs in {workdir}", flush=True)
    results: dict[str, dict[str, Sample]] = {}
    redis, redis_url = start_redis(workdir)
    upstream, upstream_url = start_upstream(workdir)
    try:
        # Redis (any number of gateways) with allowances (the default) and without (every
        # admission a Redis call), then the in-process store (one gateway) for contrast.
        configurations: tuple[tuple[str, dict[str, str]], ...] = (
            ("redis", {"SLUIS_REDIS_URL": redis_url}),
            ("redis-exact", {"SLUIS_REDIS_URL": redis_url, "SLUIS_QUOTA_ALLOWANCES": "false"}),
            ("memory", {}),
        )
        for name, env in configurations:
            home = workdir / name
            home.mkdir()
            sluis, url = start_sluis_process(home, upstream_url, env)
            try:
                results[name] = run_loop(measure(url, rounds=args.rounds, per_round=args.per_round))
            finally:
                sluis.stop()
    finally:
        upstream.stop()
        redis.stop()
    report("quota store: Redis, allowances on (the multi-gateway default)", results["redis"])
    report(
        "quota store: Redis, allowances off (a Redis call per admission)", results["redis-exact"]
    )
    report("quota store: memory (the single-gateway default)", results["memory"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
