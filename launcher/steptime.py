"""Predicted step time: the estimate's per-rank FLOPs, collective payloads and optimizer traffic over
the rates `meshyard calibrate` measured on this host for the plan's backend and world size.

A sum, not a simulation: compute (matmul FLOPs at the calibrated matmul rate, stretched by the
pipeline's bubble), plus every collective at its calibrated payload rate (no overlap with compute),
plus the optimizer's elementwise pass over parameters, gradients and state; the slowest rank sets
the step. What this leaves out (elementwise and Python overhead, data loading, latency of small
messages) is listed in docs/planning.md.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from launcher.estimate import Estimate, RankEstimate
from launcher.plan import Plan
from launcher.profile import Measured, load_measured, profile_path

# the calibrated collective whose rate prices each payload the estimate counts
RATE_OF = {"all_reduce": "all_reduce", "all_reduce_tp": "all_reduce", "all_gather": "all_gather",
           "reduce_scatter": "reduce_scatter", "broadcast": "broadcast", "send_recv": "send_recv"}


@dataclass(frozen=True)
class StepTime:
    predicted_step_time_s: float
    compute_s: float  # the slowest rank's matmuls, pipeline bubble included
    communication_s: float
    optimizer_s: float
    pipeline_rank: int  # the slowest
    predicted_mfu: float  # model FLOPs per step / (step time x world size x calibrated matmul rate)
    profile: str  # which calibration, and when

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (f"step time        {1000 * self.predicted_step_time_s:.1f} ms predicted = compute"
                f" {1000 * self.compute_s:.1f} + communication {1000 * self.communication_s:.1f} + optimizer"
                f" {1000 * self.optimizer_s:.1f} ms (slowest rank; MFU {100 * self.predicted_mfu:.0f}%;"
                f" profile {self.profile})")


def bubble(plan: Plan) -> float:
    """Pipeline step time over its busy time: (chunks + p - 1) / chunks for m micro-batches of v stages per rank."""
    layout = plan.layout
    if layout is None or plan.pp_degree == 1:
        return 1.0
    chunks = layout.microbatches * layout.stages_per_rank
    return (chunks + layout.pp_degree - 1) / chunks


def _rank_seconds(rank: RankEstimate, measured: Measured, matmul_rate: float, stretch: float) -> tuple[float, ...]:
    compute = (rank.flops_per_step or 0) / matmul_rate * stretch
    rates = measured.collective_bytes_per_s
    communication = sum(size / rates[RATE_OF[op]] for op, size in rank.collective_bytes.items()
                        if RATE_OF.get(op) in rates)
    # read weights, gradients and state; write weights and state
    traffic = 2 * rank.param_bytes + rank.grad_bytes + 2 * rank.optimizer_bytes
    return compute, communication, traffic / measured.memory_bytes_per_s


def predict_step_time(estimate: Estimate, plan: Plan, precision: str,
                      measured: Measured | None = None) -> StepTime | str:
    """The prediction, or one line saying why there is none."""
    if estimate.flops_per_step is None:
        return "needs the traced FLOPs (activations were not traced)"
    measured = measured or load_measured(plan.backend, plan.world_size)
    if measured is None:
        return (f"no machine profile for {plan.backend} at world size {plan.world_size} on this host"
                f" ({profile_path()}): run `meshyard calibrate --procs {plan.world_size}`")
    rate = measured.matmul_flops_per_s[precision]
    per_rank = [_rank_seconds(rank, measured, rate, bubble(plan)) for rank in estimate.ranks]
    slowest = max(range(len(per_rank)), key=lambda i: sum(per_rank[i]))
    compute, communication, optimizer = per_rank[slowest]
    total = compute + communication + optimizer
    return StepTime(predicted_step_time_s=total, compute_s=compute, communication_s=communication,
                    optimizer_s=optimizer, pipeline_rank=estimate.ranks[slowest].pipeline_rank,
                    predicted_mfu=estimate.flops_per_step / (total * plan.world_size * rate),
                    profile=f"{measured.key}, {measured.threads_per_rank} thread(s) per rank,"
                            f" measured {measured.measured_at}")
