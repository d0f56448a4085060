"""Every PromQL expression Sluis ships, from the committed files: each dashboard panel's
queries, each template variable's, each recording rule's and each alert's. Used to check them
against a real Prometheus (tests/deployments/test_dashboards.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
GRAFANA_DIR = HERE / "grafana"
PROMETHEUS_DIR = HERE / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
_LABEL_VALUES = re.compile(r"^label_values\((?P<metric>[^,]+),\s*(?P<label>\w+)\)$")
_COMPARISON = re.compile(r"^(?P<signal>.+?)\s*(?:>|<|>=|<=|==|!=)\s*[-0-9.e]+$", re.DOTALL)


@dataclass(frozen=True)
class Expression:
    where: str  # e.g. "capacity.json: Time to first token [B]"
    expr: str
    # Shows data only once something failed (errors, fail-opens, rejections).
    failure_case: bool = False
    # For alerts: the expression without its threshold, which must always have data.
    signal: str | None = None


def concrete(expr: str, *, rate_interval: str = "1m", time_range: str = "1h") -> str:
    """A dashboard expression as Grafana would send it with every tenant and model selected."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$__range", time_range)
        .replace("$tenant", ".*")
        .replace("$model", ".*")
    )


def label_values(query: str) -> tuple[str, str]:
    """A template variable's `label_values(metric, label)`, as (metric, label)."""
    found = _LABEL_VALUES.match(query.strip())
    if found is None:
        raise ValueError(f"not a label_values() query: {query}")
    return found["metric"].strip(), found["label"]


def panels() -> Iterator[Expression]:
    for path in sorted(GRAFANA_DIR.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            failure = bool(panel.get("sluis", {}).get("failure_case"))
            for target in panel.get("targets", []):
                where = f"{path.name}: {panel['title']} [{target['refId']}]"
                yield Expression(where, target["expr"], failure_case=failure)


def variables() -> Iterator[tuple[str, str]]:
    """(where, label_values query) of every dashboard's query variables."""
    for path in sorted(GRAFANA_DIR.glob("*.json")):
        for variable in json.loads(path.read_text())["templating"]["list"]:
            if variable["type"] == "query":
                yield f"{path.name}: ${variable['name']}", variable["definition"]


def rules() -> Iterator[Expression]:
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                expr = " ".join(rule["expr"].split())
                if "record" in rule:
                    yield Expression(f"{path.name}: {rule['record']}", expr)
                    continue
                found = _COMPARISON.match(expr)
                if found is None:
                    raise ValueError(f"{path.name}: {rule['alert']}: not 'signal > threshold'")
                yield Expression(f"{path.name}: {rule['alert']}", expr, signal=found["signal"])
