"""`make bench-gateway`: what the gateway adds over calling the upstream directly, side by side
with LiteLLM's proxy, in one run.

Layout on a 2-core machine: the fake upstream and this load generator share core 0; the proxy
under test (Sluis or LiteLLM, one worker each) gets core 1 to itself. Sluis runs with auth
(a real tenant key), metering (SQLite ledger) and quotas (all six limits set, none reached, the
default in-process store) on.

1. Concurrency 1: p50/p99 latency direct vs through each proxy; "added" is the difference.
2. Open-loop rate sweep: the highest arrival rate at which each proxy's p99 stays within 10 ms of
   the direct p99 at the same rate (latency from the scheduled send time).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from gateway.serve import run_async as run_loop
from loadtests.httpload import Sample, Target, closed_loop, open_loop
from loadtests.processes import Process, free_port, pinned, sluis_gateway_command

ADMIN_TOKEN = "bench-admin-token-0123456789"
LITELLM_KEY = "sk-bench-master-key"
BODY = json.dumps(
    {
        "model": "fake-chat",
        "messages": [
            {"role": "user", "content": "How many locks does the Amsterdam canal ring have?"}
        ],
        "max_tokens": 16,
    }
).encode()
RATES = (
    25,
    50,
    100,
    150,
    200,
    300,
    400,
    600,
    800,
    1000,
    1100,
    1250,
    1400,
    1500,
    1750,
    2000,
    2500,
    3000,
    4000,
)
ADDED_P99_BUDGET_S = 0.010


@dataclass
class Proxy:
    name: str
    target: Target


@dataclass
class Result:
    latency: Sample
    saturated: Sample
    best_rate: float = 0.0
    sweep: list[dict[str, float]] = field(default_factory=list)


def start_upstream(workdir: Path) -> tuple[Process, str]:
    port = free_port()
    process = Process(
        "fake upstream",
        pinned([sys.executable, "-m", "gateway.cli", "fake-engine", "--port", str(port)], "0"),
        log=workdir / "upstream.log",
    )
    process.wait_port(port)
    return process, f"http://127.0.0.1:{port}/v1"


def start_sluis_process(
    workdir: Path, upstream: str, extra_env: dict[str, str] | None = None
) -> tuple[Process, str]:
    """`sluis gateway` on core 1, with auth and metering (SQLite) on; returns its URL."""
    port = free_port()
    env = {
        "SLUIS_ADMIN_TOKEN": ADMIN_TOKEN,
        "SLUIS_STATE_DIR": str(workdir / "sluis"),
        "SLUIS_DATABASE_URL": f"sqlite+aiosqlite:///{workdir}/sluis/sluis.db",
        "SLUIS_METRICS_PORT": "0",
        **(extra_env or {}),
    }
    command = sluis_gateway_command(upstream, port)
    process = Process(
        "sluis", pinned(command, "1"), env=env, cwd=workdir, log=workdir / "sluis.log"
    )
    process.wait_port(port)
    return process, f"http://127.0.0.1:{port}"


def tenant_target(url: str, name: str, quotas: dict[str, object] | None = None) -> Target:
    """A new tenant (with these quotas) and a chat request target carrying its key."""
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    body: dict[str, object] = {"name": name, "models": ["*"]}
    if quotas:
        body["quotas"] = quotas
    httpx.post(f"{url}/admin/v1/tenants", json=body, headers=admin).raise_for_status()
    key = httpx.post(f"{url}/admin/v1/tenants/{name}/keys", json={}, headers=admin).json()["key"]
    return Target.post_json(f"{url}/v1/chat/completions", BODY, {"authorization": f"Bearer {key}"})


# Quotas on (the default in-process store), every limit set and none of them reached.
BENCH_QUOTAS: dict[str, object] = {
    "requests_per_minute": 10**7,
    "tokens_per_minute": 10**9,
    "max_concurrent": 10**4,
    "tokens_per_day": 10**12,
    "tokens_per_month": 10**13,
    "eur_per_month": 10**9,
}


def start_sluis(workdir: Path, upstream: str) -> tuple[Process, Proxy]:
    process, url = start_sluis_process(workdir, upstream)
    return process, Proxy("sluis", tenant_target(url, "bench", BENCH_QUOTAS))


def start_litellm(workdir: Path, upstream: str, litellm: str) -> tuple[Process, Proxy]:
    port = free_port()
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: fake-chat\n"
        "    litellm_params:\n"
        "      model: openai/fake-chat\n"
        f"      api_base: {upstream}\n"
        "      api_key: none\n"
        "general_settings:\n"
        f"  master_key: {LITELLM_KEY}\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    env = {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        "DISABLE_SCHEMA_UPDATE": "true",
    }
    process = Process(
        "litellm",
        pinned([litellm, "--config", str(config), "--port", str(port), "--num_workers", "1"], "1"),
        env=env,
        cwd=workdir,
        log=workdir / "litellm.log",
    )
    process.wait_port(port, timeout=180)
    target = Target.post_json(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        BODY,
        {"authorization": f"Bearer {LITELLM_KEY}"},
    )
    return process, Proxy("litellm", target)


def ms(seconds: float) -> str:
    return "inf" if seconds == float("inf") else f"{seconds * 1000:.2f}"


async def measure(target: Target, *, requests: int, step_s: float) -> Result:
    await closed_loop(target, requests=300)  # warm-up: connections, caches
    latency = await closed_loop(target, requests=requests)
    saturated = await closed_loop(target, seconds=step_s * 2, concurrency=32)
    return Result(latency=latency, saturated=saturated)


async def sweep(
    proxy: Proxy, direct: Target, direct_p99: dict[int, float], result: Result, *, step_s: float
) -> None:
    """Raise the arrival rate until the added p99 passes the budget (or errors appear)."""
    for rate in RATES:
        if rate not in direct_p99:
            direct_p99[rate] = (await open_loop(direct, rate=rate, seconds=step_s)).percentile(99)
        sample = await open_loop(proxy.target, rate=rate, seconds=step_s)
        if not _within_budget(sample, direct_p99[rate]):
            # These machines are shared: a step fails only if it fails twice running.
            sample = await open_loop(proxy.target, rate=rate, seconds=step_s)
        result.sweep.append(
            {
                "rate": rate,
                "direct_p99_ms": direct_p99[rate] * 1000,
                "p99_ms": sample.percentile(99) * 1000,
                "errors": sample.errors,
            }
        )
        print(
            f"  {proxy.name} at {rate:>5}/s: p99 {ms(sample.percentile(99))} ms "
            f"(direct {ms(direct_p99[rate])} ms), errors {sample.errors}",
            flush=True,
        )
        if not _within_budget(sample, direct_p99[rate]):
            return
        result.best_rate = rate


def _within_budget(sample: Sample, direct_p99: float) -> bool:
    return sample.errors == 0 and sample.percentile(99) - direct_p99 <= ADDED_P99_BUDGET_S


def report(results: dict[str, Result]) -> str:
    direct = results["direct"]
    lines = [
        "",
        "| | p50 ms | p99 ms | added p50 ms | added p99 ms | max rate, added p99 <= 10 ms |"
        " requests/s at concurrency 32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        sample = result.latency
        added = (
            "| | |"
            if name == "direct"
            else f"| {ms(sample.percentile(50) - direct.latency.percentile(50))} | "
            f"{ms(sample.percentile(99) - direct.latency.percentile(99))} |"
        )
        rate = "" if name == "direct" else f"{result.best_rate:.0f}/s"
        lines.append(
            f"| {name} | {ms(sample.percentile(50))} | {ms(sample.percentile(99))} {added}"
            f" {rate} | {result.saturated.throughput:.0f} |"
        )
    if "litellm" in results:
        sluis, litellm = results["sluis"], results["litellm"].saturated.throughput
        lines.append(
            f"\nthroughput at concurrency 32, sluis / litellm: "
            f"{sluis.saturated.throughput / litellm:.1f}x"
        )
        lines.append(
            f"sluis's max rate within 10 ms added p99 / litellm's throughput: "
            f"{sluis.best_rate / litellm:.1f}x"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--litellm", help="path to LiteLLM's `litellm` command (its own venv)")
    parser.add_argument("--requests", type=int, default=2000, help="requests at concurrency 1")
    parser.add_argument("--step-seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=Path("loadtests/results"))
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {0})
    workdir = Path(tempfile.mkdtemp(prefix="sluis-bench-"))
    starters: list[tuple[str, Callable[[str], tuple[Process, Proxy]]]] = [
        ("sluis", lambda upstream: start_sluis(workdir, upstream))
    ]
    if args.litellm:
        command = str(Path(args.litellm).resolve())
        starters.append(("litellm", lambda upstream: start_litellm(workdir, upstream, command)))
    print(f"bench-gateway: {', '.join(n for n, _ in starters)} vs direct; logs in {workdir}")
    results: dict[str, Result] = {}
    upstream, upstream_url = start_upstream(workdir)
    try:
        direct = Target.post_json(f"{upstream_url}/chat/completions", BODY, {})
        results["direct"] = run_loop(
            measure(direct, requests=args.requests, step_s=args.step_seconds)
        )
        direct_p99: dict[int, float] = {}
        # One proxy at a time on core 1, so that neither steals the other's CPU.
        for name, start in starters:
            process, proxy = start(upstream_url)
            try:
                result = run_loop(
                    measure(proxy.target, requests=args.requests, step_s=args.step_seconds)
                )
                print(
                    f"  {name}: {result.saturated.throughput:.0f} requests/s at concurrency 32",
                    flush=True,
                )
                run_loop(sweep(proxy, direct, direct_p99, result, step_s=args.step_seconds))
                results[name] = result
            finally:
                process.stop()
    finally:
        upstream.stop()
    print(report(results))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    summary = {
        name: {
            "p50_ms": r.latency.percentile(50) * 1000,
            "p99_ms": r.latency.percentile(99) * 1000,
            "throughput_c32": r.saturated.throughput,
            "best_rate": r.best_rate,
            "sweep": r.sweep,
        }
        for name, r in results.items()
    }
    (args.out / f"bench-gateway-{stamp}.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
