"""The committed dashboards, scrape config and rules: valid to Prometheus' own checker, and the
JSON is what `dashboards/boards.py` builds. (Their queries are run against a real Prometheus
scraping the real stack in tests/deployments/test_dashboards.py.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from dashboards import build, expressions
from dashboards.boards import every_dashboard

PROMETHEUS = expressions.PROMETHEUS_DIR


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_scrape_config_and_its_rule_files() -> None:
    checked = _promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 2 rule files found" in checked.stdout, checked.stdout
    assert checked.stdout.count("rules found") == 2  # and each of them was checked


@pytest.mark.parametrize("rules", expressions.RULE_FILES, ids=lambda p: p.name)
def test_promtool_accepts_the_rules(rules: Path) -> None:
    checked = _promtool("check", "rules", str(rules))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    """The check above can fail: a rule with a PromQL syntax error is refused."""
    broken = tmp_path / "broken.yml"
    broken.write_text("groups:\n  - name: x\n    rules:\n      - record: a:b\n        expr: sum(\n")
    assert _promtool("check", "rules", str(broken)).returncode != 0


def test_committed_json_is_what_the_code_builds() -> None:
    assert build.main(["--check"]) == 0


def test_dashboards_have_the_promised_views_and_variables() -> None:
    boards = {board.uid: board.json() for board in every_dashboard()}
    assert set(boards) == {"sluis-tenants", "sluis-capacity", "sluis-gateway"}
    variables = {
        uid: [v["name"] for v in board["templating"]["list"]] for uid, board in boards.items()
    }
    assert variables["sluis-tenants"] == ["datasource", "tenant", "model"]
    assert variables["sluis-capacity"] == ["datasource", "model"]
    titles = {uid: " / ".join(p["title"] for p in board["panels"]) for uid, board in boards.items()}
    for words in ("Requests", "Tokens", "Spend", "Budget left", "Quota rejections"):
        assert words in titles["sluis-tenants"]
    for words in (
        "Requests per second", "Output tokens", "Time to first token", "Time per output token",
        "queue depth", "running and waiting", "KV-cache", "replicas",
    ):  # fmt: skip
        assert words in titles["sluis-capacity"]
    for words in ("status class", "overhead", "Store failures", "in flight"):
        assert words in titles["sluis-gateway"]
    for board in boards.values():
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids))
        json.dumps(board)  # plain JSON all the way down


def test_every_alert_is_a_signal_against_a_threshold() -> None:
    alerts = [rule for rule in expressions.rules() if rule.signal is not None]
    names = {rule.where.split(": ")[1] for rule in alerts}
    assert {
        "SluisTenantNearBudget", "SluisTTFTAboveTarget", "SluisModelReplicaMissing",
        "SluisQuotaStoreFailingOpen", "SluisErrorRatioHigh",
    } <= names  # fmt: skip


def test_dashboard_variables_are_label_values_queries() -> None:
    for where, query in expressions.variables():
        metric, label = expressions.label_values(query)
        assert metric.startswith("sluis_") and label in ("tenant", "model"), where
