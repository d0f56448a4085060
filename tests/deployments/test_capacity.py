"""`sluis capacity` sweeping the real stack briefly: both tiny models, two rates each, then
the plan, the chart and the sweep file it can be re-read from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from gateway.cli import main
from loadtests.capacity import Sweep
from tests.deployments.conftest import RealStack

pytestmark = pytest.mark.real_stack

DEMAND = {
    # Loose targets: this is about the sweep working end to end, not about this machine's speed.
    "targets": {"ttft_p95_s": 10, "tpot_p95_s": 1},
    "models": {"tiny-embed": {"task": "embed"}},
    "tenants": [
        {"tenant": "a", "model": "tiny-chat", "requests_per_s": 3, "completion_tokens": 16},
        {"tenant": "b", "model": "tiny-embed", "requests_per_s": 5, "prompt_tokens": 16},
    ],
}


def test_a_short_real_sweep_yields_a_plan(
    real_stack: RealStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    demand = tmp_path / "demand.yaml"
    demand.write_text(yaml.safe_dump(DEMAND))
    out = tmp_path / "out"
    args = [
        "capacity", "--demand", str(demand), "--url", real_stack.url, "--key", real_stack.key,
        "--rates", "1,3", "--step-seconds", "4", "--max-tokens", "16",
        "--replicas", "tiny-chat=1", "--replicas", "tiny-embed=1", "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "tiny-chat" in printed and "tiny-embed" in printed
    sweeps = {
        s.model: s for s in map(Sweep.model_validate, json.loads((out / "sweep.json").read_text()))
    }
    assert set(sweeps) == {"tiny-chat", "tiny-embed"}
    for sweep in sweeps.values():
        assert [s.offered_rps for s in sweep.steps] == [1, 3]
        for step in sweep.steps:
            assert step.requests > 0 and step.errors == 0
            assert step.ttft_p95_s is not None and step.ttft_p95_s > 0
    chat = sweeps["tiny-chat"]
    assert chat.completion_tokens == 16  # min_tokens: every answer is max_tokens long
    assert all(s.tpot_p95_s is not None and s.output_tokens_per_s > 0 for s in chat.steps)
    assert all(s.tpot_p95_s is None for s in sweeps["tiny-embed"].steps)
    plans = {p["model"]: p for p in json.loads((out / "plan.json").read_text())}
    top = max(chat.steps, key=lambda s: s.offered_rps)
    assert plans["tiny-chat"]["per_replica_rps"] == top.achieved_rps  # within loose targets
    assert plans["tiny-chat"]["replicas"] >= 1
    assert (out / "capacity.png").read_bytes().startswith(b"\x89PNG")
    # The sweep is re-read without sweeping again, to the same plan.
    again = tmp_path / "again"
    assert main([*args[:3], "--sweep", str(out / "sweep.json"), "--out", str(again)]) == 0
    assert json.loads((again / "plan.json").read_text()) == list(plans.values())
