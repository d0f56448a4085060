"""`sluis capacity`: sweep each model of a demand profile (or read an earlier sweep), then report
how many replicas each model needs for its latency targets, as a table and a PNG chart."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml
from pydantic import ValidationError

from loadtests.capacity import Demand, Sweep, plan

EXIT_BAD_INPUT = 2


def add_command(commands: Any) -> None:
    capacity = commands.add_parser(
        "capacity",
        help="replicas each model needs for a demand profile, from a stepped load sweep",
        description=__doc__,
    )
    capacity.add_argument("--demand", type=Path, required=True, help="demand profile (YAML)")
    capacity.add_argument(
        "--sweep", type=Path, help="read this sweep (sweep.json) instead of running one"
    )
    capacity.add_argument("--url", help="gateway URL (default $SLUIS_URL or :8000)")
    capacity.add_argument("--key", help="tenant API key for the sweep (default $SLUIS_API_KEY)")
    capacity.add_argument(
        "--rates", default="1,2,4,8,16", help="requests/s of the sweep's steps (comma-separated)"
    )
    capacity.add_argument("--step-seconds", type=float, default=20.0)
    capacity.add_argument("--max-tokens", type=int, default=64, help="per chat request")
    capacity.add_argument(
        "--replicas",
        action="append",
        default=[],
        metavar="MODEL=N",
        help="replicas a model ran with during the sweep (default: ask Prometheus, else 1)",
    )
    capacity.add_argument("--prometheus", help="default $SLUIS_PROMETHEUS_URL or :9090")
    capacity.add_argument("--out", type=Path, default=Path("capacity-out"))
    capacity.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        demand = Demand.model_validate(yaml.safe_load(args.demand.read_text()))
        rates = [float(rate) for rate in args.rates.split(",") if rate.strip()]
        if not rates or min(rates) <= 0:
            raise ValueError("--rates: positive numbers, e.g. 1,2,4")
    except (OSError, yaml.YAMLError, ValidationError, ValueError) as exc:
        print(f"sluis capacity: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        sweeps = {s.model: s for s in map(Sweep.model_validate, json.loads(args.sweep.read_text()))}
    else:
        key = args.key or os.environ.get("SLUIS_API_KEY")
        if not key:
            print("sluis capacity: --key (or SLUIS_API_KEY) is needed to sweep", file=sys.stderr)
            return EXIT_BAD_INPUT
        url = (args.url or os.environ.get("SLUIS_URL", "http://127.0.0.1:8000")).rstrip("/")
        sweeps = _sweep_all(args, demand, url, key, rates)
        (args.out / "sweep.json").write_text(
            json.dumps([s.model_dump() for s in sweeps.values()], indent=2) + "\n"
        )
    try:
        plans = plan(sweeps, demand)
    except ValueError as exc:
        print(f"sluis capacity: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from loadtests import capacity_report

    print(capacity_report.table(plans))
    capacity_report.chart(sweeps, plans, args.out / "capacity.png")
    (args.out / "plan.json").write_text(
        json.dumps([p.__dict__ | {"targets": p.targets.model_dump()} for p in plans], indent=2)
    )
    print(f"\nwritten: {args.out}/capacity.png, plan.json" + ("" if args.sweep else ", sweep.json"))
    return 0 if all(p.feasible for p in plans) else 1


def _sweep_all(
    args: argparse.Namespace, demand: Demand, url: str, key: str, rates: list[float]
) -> dict[str, Sweep]:
    from loadtests.sweep import SweepSpec, run_sweep

    given = dict(item.split("=", 1) for item in args.replicas)
    prometheus = args.prometheus or os.environ.get("SLUIS_PROMETHEUS_URL", "http://127.0.0.1:9090")
    sweeps = {}
    for model in demand.model_ids():
        replicas = int(given[model]) if model in given else _replicas(prometheus, model)
        print(f"sweeping {model} ({replicas} replica(s)), {args.step_seconds:g} s per step")
        spec = SweepSpec(
            url=url,
            key=key,
            model=model,
            task=demand.task_for(model),
            rates=rates,
            step_s=args.step_seconds,
            max_tokens=args.max_tokens,
        )
        sweeps[model] = asyncio.run(run_sweep(spec, replicas))
    return sweeps


def _replicas(prometheus: str, model: str) -> int:
    """Healthy Ray Serve replicas of the model, as Prometheus last saw them; 1 if unknown."""
    query = f'sum(ray_serve_deployment_replica_healthy{{deployment="model-{model}"}})'
    try:
        response = httpx.get(f"{prometheus}/api/v1/query", params={"query": query}, timeout=5)
        result = response.json()["data"]["result"]
        return max(1, round(float(result[0]["value"][1]))) if result else 1
    except (httpx.HTTPError, ValueError, KeyError):
        return 1
