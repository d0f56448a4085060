"""`sluis capacity`: sweep each model of a demand profile (or read an earlier sweep), then report
how many replicas each model needs for its latency targets, as a table and a PNG chart."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

from billing.prometheus import BillingError, PrometheusReader
from loadtests.capacity import Demand, Sweep, plan

EXIT_BAD_INPUT = 2
T = TypeVar("T")


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


class CapacityError(Exception):
    def __init__(self, message: str, *, exit_code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except CapacityError as exc:
        print(f"sluis capacity: {exc}", file=sys.stderr)
        return exc.exit_code


def _run(args: argparse.Namespace) -> int:
    demand = _read(args.demand, lambda text: Demand.model_validate(yaml.safe_load(text)))
    rates = _rates(args.rates)
    given = _given_replicas(args.replicas)
    if args.sweep:
        swept = _read(
            args.sweep, lambda text: [Sweep.model_validate(item) for item in json.loads(text)]
        )
        sweeps = {sweep.model: sweep for sweep in swept}
    else:
        key = args.key or os.environ.get("SLUIS_API_KEY")
        if not key:
            raise CapacityError("--key (or SLUIS_API_KEY) is needed to sweep")
        url = (args.url or os.environ.get("SLUIS_URL", "http://127.0.0.1:8000")).rstrip("/")
        _check_target(url, key, demand.model_ids())
        sweeps = _sweep_all(args, demand, url, key, rates, given)
    try:
        plans = plan(sweeps, demand)
    except ValueError as exc:
        raise CapacityError(str(exc)) from exc
    from loadtests import capacity_report

    args.out.mkdir(parents=True, exist_ok=True)
    if not args.sweep:
        (args.out / "sweep.json").write_text(
            json.dumps([s.model_dump() for s in sweeps.values()], indent=2) + "\n"
        )
    print(capacity_report.table(plans))
    capacity_report.chart(sweeps, plans, args.out / "capacity.png")
    (args.out / "plan.json").write_text(
        json.dumps([p.__dict__ | {"targets": p.targets.model_dump()} for p in plans], indent=2)
    )
    print(f"\nwritten: {args.out}/capacity.png, plan.json" + ("" if args.sweep else ", sweep.json"))
    return 0 if all(p.feasible for p in plans) else 1


def _read(path: Path, parse: Callable[[str], T]) -> T:
    try:
        return parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:  # ValidationError is a ValueError
        raise CapacityError(f"{path}: {exc}") from exc


def _rates(text: str) -> list[float]:
    try:
        rates = [float(rate) for rate in text.split(",") if rate.strip()]
    except ValueError:
        rates = []
    if not rates or min(rates) <= 0:
        raise CapacityError(f"--rates takes positive numbers, e.g. 1,2,4; not {text!r}")
    return rates


def _given_replicas(items: list[str]) -> dict[str, int]:
    given = {}
    for item in items:
        model, _, count = item.partition("=")
        if not count.isdigit() or int(count) < 1:
            raise CapacityError(f"--replicas takes MODEL=N (N >= 1), not {item!r}")
        given[model] = int(count)
    return given


def _check_target(url: str, key: str, models: list[str]) -> None:
    """Before loading anything: the gateway answers, takes the key and serves every model."""
    try:
        answer = httpx.get(
            f"{url}/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=10
        )
    except httpx.HTTPError as exc:
        raise CapacityError(f"cannot reach the gateway at {url}: {exc}", exit_code=3) from exc
    if answer.status_code in (401, 403):
        raise CapacityError(f"the gateway at {url} refused the key ({answer.status_code})")
    if answer.status_code != 200:
        raise CapacityError(f"{url}/v1/models answered {answer.status_code}", exit_code=3)
    served = {model["id"] for model in answer.json().get("data", [])}
    missing = [model for model in models if model not in served]
    if missing:
        raise CapacityError(
            f"not served to this key: {', '.join(missing)} (served: {', '.join(sorted(served))})"
        )


def _sweep_all(
    args: argparse.Namespace,
    demand: Demand,
    url: str,
    key: str,
    rates: list[float],
    given: dict[str, int],
) -> dict[str, Sweep]:
    from loadtests.sweep import SweepSpec, run_sweep

    prometheus = args.prometheus or os.environ.get("SLUIS_PROMETHEUS_URL", "http://127.0.0.1:9090")
    sweeps = {}
    for model in demand.model_ids():
        replicas = given[model] if model in given else _replicas(prometheus, model)
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
    reader = PrometheusReader(prometheus, timeout_s=5)
    query = f'sum(ray_serve_deployment_replica_healthy{{deployment="model-{model}"}})'
    try:
        found = reader.vector(query, datetime.now(UTC))
    except BillingError:  # Prometheus unreachable or refusing: assume one
        return 1
    finally:
        reader.close()
    return max(1, round(next(iter(found.values()), 1)))
