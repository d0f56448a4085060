"""The capacity plan's arithmetic on a fixed sweep, and `sluis capacity` reading it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import main
from loadtests.capacity import Demand, Step, Sweep, Targets, plan
from tests.conftest import RunningGateway

PNG = b"\x89PNG\r\n\x1a\n"


def _step(offered: float, achieved: float, tokens: float, ttft: float, tpot: float | None) -> Step:
    return Step(
        offered_rps=offered,
        achieved_rps=achieved,
        output_tokens_per_s=tokens,
        ttft_p95_s=ttft,
        tpot_p95_s=tpot,
        requests=round(offered * 20),
    )


CHAT = Sweep(
    model="tiny-chat",
    task="generate",
    replicas=2,
    prompt_tokens=30,
    completion_tokens=64,
    steps=[
        _step(2, 2.0, 128, 0.10, 0.020),
        _step(4, 4.0, 256, 0.20, 0.030),
        _step(8, 7.9, 505, 0.45, 0.045),
        _step(16, 10.0, 640, 3.00, 0.200),
    ],
)
EMBED = Sweep(
    model="tiny-embed",
    task="embed",
    replicas=1,
    prompt_tokens=16,
    completion_tokens=0,
    steps=[
        _step(10, 10.0, 0, 0.05, None),
        _step(20, 19.5, 0, 0.20, None),
        _step(40, 25.0, 0, 1.00, None),
    ],
)
DEMAND: dict[str, Any] = {
    "targets": {"ttft_p95_s": 0.5, "tpot_p95_s": 0.05},
    "headroom": 0.2,
    "models": {"tiny-embed": {"task": "embed", "ttft_p95_s": 0.25}},
    "tenants": [
        {"tenant": "startups", "model": "tiny-chat", "requests_per_s": 6, "completion_tokens": 64},
        {"tenant": "agency", "model": "tiny-chat", "requests_per_s": 2, "completion_tokens": 48},
        {"tenant": "batch", "model": "tiny-chat", "requests_per_s": 1, "completion_tokens": 256},
        {"tenant": "agency", "model": "tiny-embed", "requests_per_s": 20, "prompt_tokens": 16},
    ],
}


def test_replicas_follow_from_the_sustainable_step_and_the_demand() -> None:
    chat, embed = plan({"tiny-chat": CHAT, "tiny-embed": EMBED}, Demand.model_validate(DEMAND))
    # Chat: the 8 req/s step is the last within TTFT 0.5 s and TPOT 50 ms, on 2 replicas.
    assert (chat.per_replica_rps, chat.per_replica_tokens_per_s) == (3.95, 252.5)
    assert (chat.demand_rps, chat.demand_tokens_per_s) == (9, 6 * 64 + 2 * 48 + 256)
    # Requests: 9 / (3.95 x 0.8) = 2.85; tokens: 736 / (252.5 x 0.8) = 3.64 -> 4 replicas.
    assert chat.replicas == 4
    # Embeddings: the 20 req/s step holds its own 0.25 s target; 20 / (19.5 x 0.8) -> 2.
    assert (embed.per_replica_rps, embed.replicas) == (19.5, 2)
    assert embed.targets == Targets(ttft_p95_s=0.25, tpot_p95_s=None)


def test_the_sustainable_step_is_the_last_of_an_unbroken_run() -> None:
    targets = Targets(ttft_p95_s=0.5)
    broken = CHAT.model_copy(
        update={"steps": [CHAT.steps[0], _step(4, 4, 256, 0.9, 0.03), CHAT.steps[2]]}
    )
    assert broken.sustainable(targets) == CHAT.steps[0]  # 8 req/s passing again does not count
    errors = CHAT.steps[1].model_copy(update={"errors": 1})
    assert not errors.holds(targets)
    behind = _step(4, 3.5, 224, 0.2, 0.03)  # answers came back under 90% of the send rate
    assert not behind.holds(targets)
    assert _step(4, 3.6, 230, 0.2, 0.03).holds(targets)
    # Poisson arrivals sent fewer than nominal: measured against what was really sent.
    assert behind.model_copy(update={"sent_rps": 3.8}).holds(targets)


def test_targets_missed_at_every_rate_mean_no_plan() -> None:
    demand = Demand.model_validate({**DEMAND, "targets": {"ttft_p95_s": 0.01}})
    chat = plan({"tiny-chat": CHAT, "tiny-embed": EMBED}, demand)[0]
    assert chat.replicas is None and not chat.feasible


def test_a_demand_for_a_model_never_swept_is_an_error() -> None:
    with pytest.raises(ValueError, match="no sweep for model 'tiny-embed'"):
        plan({"tiny-chat": CHAT}, Demand.model_validate(DEMAND))


def _files(tmp_path: Path, demand: dict[str, Any]) -> tuple[Path, Path]:
    demand_file = tmp_path / "demand.yaml"
    demand_file.write_text(yaml.safe_dump(demand))
    sweep_file = tmp_path / "sweep.json"
    sweep_file.write_text(json.dumps([CHAT.model_dump(), EMBED.model_dump()]))
    return demand_file, sweep_file


def test_sluis_capacity_reads_a_sweep_and_writes_table_chart_and_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    demand_file, sweep_file = _files(tmp_path, DEMAND)
    out = tmp_path / "out"
    code = main(
        ["capacity", "--demand", str(demand_file), "--sweep", str(sweep_file), "--out", str(out)]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "tiny-chat" in table and "tiny-embed" in table
    assert (out / "capacity.png").read_bytes().startswith(PNG)
    saved = {p["model"]: p for p in json.loads((out / "plan.json").read_text())}
    assert (saved["tiny-chat"]["replicas"], saved["tiny-embed"]["replicas"]) == (4, 2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"headroom": 1.5}, "headroom"),
        ({"tenants": []}, "tenants"),
        ({"targets": {"ttft_p95_s": -1}}, "ttft_p95_s"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_a_bad_demand_profile_is_refused_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, Any], message: str
) -> None:
    demand_file, sweep_file = _files(tmp_path, {**DEMAND, **change})
    out = tmp_path / "out"
    code = main(
        ["capacity", "--demand", str(demand_file), "--sweep", str(sweep_file), "--out", str(out)]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing written


FAKE_DEMAND: dict[str, Any] = {
    "targets": {"ttft_p95_s": 5, "tpot_p95_s": 1},
    "tenants": [{"tenant": "a", "model": "fake-chat", "requests_per_s": 3, "completion_tokens": 8}],
}


def _capacity(tmp_path: Path, *args: str, demand: dict[str, Any] | None = None) -> int:
    demand_file = tmp_path / "demand.yaml"
    demand_file.write_text(yaml.safe_dump(demand or FAKE_DEMAND))
    out = tmp_path / "out"
    return main(["capacity", "--demand", str(demand_file), "--out", str(out), *args])


def test_a_sweep_through_a_gateway_in_front_of_the_fake_engine(
    gateway: RunningGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = gateway.create_tenant("planner")
    args = ("--url", gateway.url, "--key", key, "--rates", "2,4", "--step-seconds", "1")
    assert _capacity(tmp_path, *args, "--replicas", "fake-chat=2") == 0
    [sweep] = [
        Sweep.model_validate(s) for s in json.loads((tmp_path / "out/sweep.json").read_text())
    ]
    assert (sweep.model, sweep.replicas, [s.offered_rps for s in sweep.steps]) == (
        "fake-chat",
        2,
        [2, 4],
    )
    assert all(s.errors == 0 and s.requests > 0 and s.tpot_p95_s is not None for s in sweep.steps)
    assert "fake-chat" in capsys.readouterr().out
    records = gateway.records()
    assert len(records) == sum(s.requests for s in sweep.steps)  # every request was metered


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--url", "http://127.0.0.1:9", "--key", "k"], 3, "cannot reach the gateway"),
        (["--key", "sk-sluis-aaaaaaaaaaaa-" + "b" * 40], 2, "refused the key"),
        (["--rates", "1,fast"], 2, "--rates"),
        (["--rates", "0"], 2, "--rates"),
        (["--replicas", "fake-chat"], 2, "--replicas"),
        (["--sweep", "missing.json"], 2, "missing.json"),
    ],
)
def test_bad_input_to_sluis_capacity_fails_clearly_and_writes_nothing(
    gateway: RunningGateway,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    code: int,
    message: str,
) -> None:
    monkeypatch.setenv("SLUIS_URL", gateway.url)
    monkeypatch.chdir(tmp_path)
    assert _capacity(tmp_path, *args) == code
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_model_the_key_may_not_use_is_refused_before_any_load(
    gateway: RunningGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = gateway.create_tenant("narrow", models=["fake-chat"])
    demand = {**FAKE_DEMAND, "tenants": [{**FAKE_DEMAND["tenants"][0], "model": "fake-embed"}]}
    assert _capacity(tmp_path, "--url", gateway.url, "--key", key, demand=demand) == 2
    assert "not served to this key: fake-embed" in capsys.readouterr().err
    assert gateway.records() == []
