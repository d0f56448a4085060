"""The capacity plan as a table and as a PNG chart (latency vs load, with the target lines)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from loadtests.capacity import ModelPlan, Sweep


def table(plans: list[ModelPlan]) -> str:
    header = (
        f"{'model':<14} {'demand req/s':>12} {'demand tok/s':>12} {'req/s/replica':>13} "
        f"{'tok/s/replica':>13} {'replicas':>8}  targets (p95)"
    )
    lines = [header, "-" * len(header)]
    for p in plans:
        targets = f"TTFT {p.targets.ttft_p95_s * 1000:.0f} ms"
        if p.targets.tpot_p95_s is not None:
            targets += f", TPOT {p.targets.tpot_p95_s * 1000:.0f} ms"
        if p.feasible:
            assert p.per_replica_rps is not None and p.per_replica_tokens_per_s is not None
            capacity = f"{p.per_replica_rps:>13.2f} {p.per_replica_tokens_per_s:>13.0f}"
            replicas = f"{p.replicas:>8}"
        else:
            capacity = f"{'-':>13} {'-':>13}"
            replicas = f"{'none':>8}"
        lines.append(
            f"{p.model:<14} {p.demand_rps:>12.2f} {p.demand_tokens_per_s:>12.0f} {capacity} "
            f"{replicas}  {targets}"
        )
    for p in plans:
        if not p.feasible:
            lines.append(
                f"{p.model}: even the lowest swept rate missed the targets; sweep lower rates, "
                "relax the targets or give each replica more resources."
            )
    return "\n".join(lines)


def chart(sweeps: dict[str, Sweep], plans: list[ModelPlan], png: Path) -> None:
    """Per model: TTFT p95 and time per output token p95 against the offered rate per
    replica, the targets as dashed lines, the sustainable rate as a dotted one."""
    figure, axes_row = plt.subplots(1, len(plans), figsize=(6 * len(plans), 4.5), squeeze=False)
    for axes, plan in zip(axes_row[0], plans, strict=True):
        sweep = sweeps[plan.model]
        steps = sorted(sweep.steps, key=lambda s: s.offered_rps)
        rates = [s.offered_rps / sweep.replicas for s in steps]
        ttft = [s.ttft_p95_s * 1000 if s.ttft_p95_s is not None else float("nan") for s in steps]
        axes.plot(rates, ttft, "o-", label="TTFT p95")
        axes.axhline(
            plan.targets.ttft_p95_s * 1000, linestyle="--", color="C0", label="TTFT target"
        )
        if sweep.task == "generate":
            tpot = [s.tpot_p95_s * 1000 if s.tpot_p95_s else float("nan") for s in steps]
            axes.plot(rates, tpot, "s-", color="C1", label="TPOT p95")
            if plan.targets.tpot_p95_s is not None:
                axes.axhline(
                    plan.targets.tpot_p95_s * 1000, linestyle="--", color="C1", label="TPOT target"
                )
        if plan.per_replica_rps is not None:
            axes.axvline(plan.per_replica_rps, linestyle=":", color="k", label="sustainable")
        axes.set_yscale("log")
        axes.set_xlabel("offered requests/s per replica")
        axes.set_ylabel("ms")
        plural = "" if plan.replicas == 1 else "s"
        needs = f"{plan.replicas} replica{plural}" if plan.feasible else "targets not met"
        axes.set_title(f"{plan.model}: demand {plan.demand_rps:g} req/s -> {needs}")
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)
