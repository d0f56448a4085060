"""Capacity planning arithmetic: from a stepped load sweep of each model to the replicas a
demand profile needs.

A sweep offers a model rising request rates (open loop), one step at a time, and measures each
step as clients see it. The sustainable step is the highest whose every lower step also held:
TTFT p95 and time per output token p95 within the targets, no errors, and answers coming back
at no less than 90% of the rate requests were sent (a model that falls behind keeps answering
long after the step's sends end). Per replica, that step's rate and output tokens/s are what
one replica can take. A demand (tenants x requests/s x tokens) then needs, per model,

    replicas = ceil(max(demand req/s / usable req/s, demand out tokens/s / usable tokens/s))

where usable = per-replica capacity x (1 - headroom). The token term covers demand whose answers
are longer than the sweep's; the request term covers prompts and embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ANSWERED_SHARE = 0.9


class Targets(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttft_p95_s: float = Field(gt=0)
    tpot_p95_s: float | None = Field(default=None, gt=0)


class DemandLine(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant: str
    model: str
    requests_per_s: float = Field(ge=0)
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)


class ModelDemand(BaseModel):
    """Per model: its task, and targets that differ from the profile's."""

    model_config = ConfigDict(extra="forbid")
    task: Literal["generate", "embed"] = "generate"
    ttft_p95_s: float | None = Field(default=None, gt=0)
    tpot_p95_s: float | None = Field(default=None, gt=0)


class Demand(BaseModel):
    """The demand profile (YAML): targets, per-model task and targets, headroom, tenants."""

    model_config = ConfigDict(extra="forbid")
    targets: Targets
    models: dict[str, ModelDemand] = Field(default_factory=dict)
    headroom: float = Field(default=0.2, ge=0, lt=1)
    tenants: list[DemandLine] = Field(min_length=1)

    def task_for(self, model: str) -> str:
        return self.models.get(model, ModelDemand()).task

    def targets_for(self, model: str) -> Targets:
        spec = self.models.get(model, ModelDemand())
        tpot = spec.tpot_p95_s or self.targets.tpot_p95_s
        return Targets(
            ttft_p95_s=spec.ttft_p95_s or self.targets.ttft_p95_s,
            tpot_p95_s=None if spec.task == "embed" else tpot,
        )

    def model_ids(self) -> list[str]:
        return list(dict.fromkeys(line.model for line in self.tenants))


class Step(BaseModel):
    offered_rps: float  # the step's nominal rate
    # What was really sent (Poisson arrivals scatter around the nominal rate); None: nominal.
    sent_rps: float | None = None
    achieved_rps: float  # answered, over the time from the first send to the last answer
    output_tokens_per_s: float
    ttft_p95_s: float | None  # None: nothing was answered
    tpot_p95_s: float | None = None  # None for embeddings
    requests: int
    errors: int = 0

    def holds(self, targets: Targets) -> bool:
        if self.errors or self.ttft_p95_s is None:
            return False
        if self.achieved_rps < ANSWERED_SHARE * (self.sent_rps or self.offered_rps):
            return False
        if self.ttft_p95_s > targets.ttft_p95_s:
            return False
        return not (
            targets.tpot_p95_s is not None
            and self.tpot_p95_s is not None
            and self.tpot_p95_s > targets.tpot_p95_s
        )


class Sweep(BaseModel):
    """One model's sweep, as `sluis capacity` writes it (sweep.json) and reads it back."""

    model: str
    task: str  # generate | embed
    replicas: int = Field(ge=1)
    prompt_tokens: float  # mean per request in the sweep
    completion_tokens: float
    steps: list[Step]

    def sustainable(self, targets: Targets) -> Step | None:
        best = None
        for step in sorted(self.steps, key=lambda s: s.offered_rps):
            if not step.holds(targets):
                break
            best = step
        return best


@dataclass(frozen=True)
class ModelPlan:
    model: str
    targets: Targets
    demand_rps: float
    demand_tokens_per_s: float
    per_replica_rps: float | None  # None: even the lowest step missed the targets
    per_replica_tokens_per_s: float | None
    replicas: int | None
    swept_replicas: int

    @property
    def feasible(self) -> bool:
        return self.replicas is not None


def plan(sweeps: dict[str, Sweep], demand: Demand) -> list[ModelPlan]:
    plans = []
    for model in demand.model_ids():
        if model not in sweeps:
            raise ValueError(f"no sweep for model {model!r} (swept: {', '.join(sweeps)})")
        sweep = sweeps[model]
        lines = [line for line in demand.tenants if line.model == model]
        demand_rps = sum(line.requests_per_s for line in lines)
        demand_tokens = sum(line.requests_per_s * line.completion_tokens for line in lines)
        targets = demand.targets_for(model)
        step = sweep.sustainable(targets)
        if step is None:
            plans.append(
                ModelPlan(
                    model, targets, demand_rps, demand_tokens, None, None, None, sweep.replicas
                )
            )
            continue
        per_rps = step.achieved_rps / sweep.replicas
        per_tokens = step.output_tokens_per_s / sweep.replicas
        usable = 1 - demand.headroom
        needed = demand_rps / (per_rps * usable)
        if demand_tokens and per_tokens:
            needed = max(needed, demand_tokens / (per_tokens * usable))
        replicas = max(1, math.ceil(needed - 1e-9))
        plans.append(
            ModelPlan(
                model,
                targets,
                demand_rps,
                demand_tokens,
                per_rps,
                per_tokens,
                replicas,
                sweep.replicas,
            )
        )
    return plans
