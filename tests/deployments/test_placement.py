"""Placement across nodes: spread replicas, node labels for data residency, clear errors.

The cluster test runs a real two-node Ray cluster on this machine (two raylets with their own
resources and `zone` labels) and deploys onto it with `sluis up --address`, as an operator
would onto a running cluster. Its models use the fake-engine backend: what is under test is
where Ray Serve puts replicas, and the vLLM path is covered by test_real_stack.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deployments.app import check_placement
from gateway.settings import ConfigError, ModelConfig
from loadtests.processes import SluisUp

REPO = Path(__file__).resolve().parents[2]

CONFIG = """
upstream: {kind: ray}
models:
  - id: spread-chat
    backend: fake
    replicas: 2
    resources: {cpus: 1}
    placement: {spread: true}
  - id: resident-chat
    backend: fake
    resources: {cpus: 1}
    placement: {node_labels: {zone: %s}}
"""


def nodes(*zones: str) -> list[dict[str, object]]:
    return [{"NodeID": f"n{i}", "Alive": True, "Labels": {"zone": z}} for i, z in enumerate(zones)]


def test_a_label_no_node_carries_is_refused_naming_the_field() -> None:
    model = ModelConfig(id="m", placement={"node_labels": {"zone": "mars"}})  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as caught:
        check_placement([model], nodes("a", "b"))
    message = str(caught.value)
    assert message.startswith("models.0.placement.node_labels: no node carries zone=mars")
    assert "zone=a" in message and "zone=b" in message


def test_spread_needs_a_node_per_replica() -> None:
    model = ModelConfig(id="m", replicas=3, placement={"spread": True})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"models.0.placement.spread: 3 replicas need 3 nodes"):
        check_placement([model], nodes("a", "b"))
    check_placement([model.model_copy(update={"replicas": 2})], nodes("a", "b"))


@pytest.fixture(scope="module")
def two_node_cluster() -> Iterator[str]:
    cluster = subprocess.Popen(
        [sys.executable, "-m", "tests.deployments.two_nodes", "serve"],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert cluster.stdout is not None and cluster.stdin is not None
    address = cluster.stdout.readline().strip()
    try:
        assert address, "the two-node cluster did not start"
        yield address
    finally:
        cluster.stdin.close()  # the helper shuts its nodes down
        cluster.wait(120)
        cluster.stdout.close()


def placement(address: str) -> dict[str, list[str]]:
    out = subprocess.run(
        [sys.executable, "-m", "tests.deployments.two_nodes", "placement", address],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_replicas_spread_over_nodes_and_labels_pin_a_model(
    two_node_cluster: str, tmp_path: Path
) -> None:
    config = tmp_path / "sluis.yaml"
    config.write_text(CONFIG % "b")
    up = SluisUp(tmp_path, config=config, extra_args=["--address", two_node_cluster])
    try:
        key = up.wait_ready(timeout=300)
        where = placement(two_node_cluster)
        assert where["model-spread-chat"] == ["a", "b"]  # one replica per node
        assert where["model-resident-chat"] == ["b"]  # only where zone=b
        for model in ("spread-chat", "resident-chat"):
            response = httpx.post(
                f"{up.url}/v1/chat/completions",
                headers={"authorization": f"Bearer {key}"},
                json={"model": model, "messages": [{"role": "user", "content": "hoi"}]},
                timeout=30,
            )
            assert response.status_code == 200, response.text
    finally:
        code = up.stop()
    assert code == 0
    # Deploying onto a cluster leaves the cluster running but takes our application away.
    assert "model-spread-chat" not in placement(two_node_cluster)


def test_a_label_no_node_carries_fails_sluis_up_clearly(
    two_node_cluster: str, tmp_path: Path
) -> None:
    config = tmp_path / "sluis.yaml"
    config.write_text(CONFIG % "mars")
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "up", "--config", str(config)],
        cwd=tmp_path,
        env={**os.environ, "RAY_ADDRESS": two_node_cluster},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "models.1.placement.node_labels: no node carries zone=mars" in result.stderr
