"""Predicted step time: the estimate's per-rank work, collective payloads and optimizer step priced at
the rates `meshyard calibrate` measured on this host for the plan's backend and world size.

A sum, not a simulation. Compute: every kernel of the traced forward and backward at its rate
(matrix multiplies at the matmul rate, fused attention at the attention rate for its precision,
direction and sequence length, other kernels' bytes at the light or heavy elementwise rate) plus
the overhead of each op dispatched, the allocations glibc maps anew at the first-touch rate, and
what tensor parallel and FSDP2 add per layer (DTensor dispatch, hooks, small collectives' latency),
stretched by the pipeline's bubble. Communication: every collective's payload at its calibrated
rate (no overlap with compute) plus the strategies' buffer copies and allocations
(launcher/buffers.py). Optimizer: the counted kernels, ops and temporaries of a real step of the
spec's optimizer, scaled to the rank's parameter tensors, at the in-cache elementwise rates (with
the extra cost of each op on DTensor parameters).
The slowest rank sets the step. What is still left out is listed in docs/planning.md.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from launcher.estimate import Estimate, RankEstimate
from launcher.opcount import Work
from launcher.plan import Plan
from launcher.profile import Measured, load_measured, profile_path

COMPUTE = ("matmul", "attention", "elementwise", "first_touch", "op_overhead", "parallel_overhead", "pipeline_bubble")
GLIBC_MAX_MMAP_THRESHOLD = 32 << 20  # where glibc's dynamic threshold stops rising (64-bit)
# the calibrated collective whose rate prices each payload the estimate counts
RATE_OF = {"all_reduce": "all_reduce", "all_reduce_tp": "all_reduce", "all_gather": "all_gather",
           "reduce_scatter": "reduce_scatter", "broadcast": "broadcast", "send_recv": "send_recv"}


@dataclass(frozen=True)
class StepTime:
    predicted_step_time_s: float
    compute_s: float  # the slowest rank's forward and backward kernels and op overhead, pipeline bubble included
    communication_s: float  # collectives' payloads and their buffer copies
    optimizer_s: float
    pipeline_rank: int  # the slowest
    predicted_mfu: float  # model FLOPs per step / (step time x world size x calibrated matmul rate)
    profile: str  # which calibration, and when
    parts: dict[str, float]  # seconds of each term: COMPUTE's, then collectives and buffer_copies (communication)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        ms = {key: f"{1000 * value:.1f}" for key, value in self.parts.items()}
        return (f"step time        {1000 * self.predicted_step_time_s:.1f} ms predicted = compute"
                f" {1000 * self.compute_s:.1f} + communication {1000 * self.communication_s:.1f} + optimizer"
                f" {1000 * self.optimizer_s:.1f} ms (slowest rank; MFU {100 * self.predicted_mfu:.0f}%;"
                f" profile {self.profile})\n"
                f"{'':<17}compute = matmul {ms['matmul']} + attention {ms['attention']} + elementwise"
                f" {ms['elementwise']} + first touch {ms['first_touch']} + op overhead {ms['op_overhead']}"
                f" + parallel overhead {ms['parallel_overhead']}"
                f" + pipeline bubble {ms['pipeline_bubble']};"
                f" communication = payload {ms['collectives']} + buffer copies {ms['buffer_copies']} ms")


def bubble(plan: Plan) -> float:
    """Pipeline step time over its busy time: (chunks + p - 1) / chunks for m micro-batches of v stages per rank."""
    layout = plan.layout
    if layout is None or plan.pp_degree == 1:
        return 1.0
    chunks = layout.microbatches * layout.stages_per_rank
    return (chunks + layout.pp_degree - 1) / chunks


def attention_rate(measured: Measured, key: str) -> float:
    """FLOP/s of attention `key` ("bf16/backward/64"): interpolated in log sequence length between the
    calibrated lengths, the nearest one's rate outside them."""
    precision, direction, seq = key.split("/")
    table = measured.attention_flops_per_s.get(f"{precision}/{direction}") or measured.attention_flops_per_s[
        f"fp32/{direction}"]
    points = sorted((int(length), rate) for length, rate in table.items())
    x = math.log(int(seq))
    for (lo, lo_rate), (hi, hi_rate) in zip(points, points[1:]):
        if x <= math.log(hi):
            t = min(1.0, max(0.0, (x - math.log(lo)) / (math.log(hi) - math.log(lo))))
            return math.exp((1 - t) * math.log(lo_rate) + t * math.log(hi_rate))
    return points[-1][1]


def mmap_threshold(plan: Plan) -> int | None:
    """The allocation size from which a CPU rank's glibc maps memory anew (and faults it in on first
    touch): MALLOC_MMAP_THRESHOLD_ as the ranks get it (launcher/allocator.py), glibc's ceiling
    where unset; None on GPUs (the caching allocator reuses its memory)."""
    if plan.device != "cpu":
        return None
    value = plan.allocator_env.get("MALLOC_MMAP_THRESHOLD_", "")
    return int(value) if value.isdigit() else GLIBC_MAX_MMAP_THRESHOLD


def price(work: Work, measured: Measured, threshold: int | None, cached: bool = False) -> dict[str, float]:
    """Seconds of `work` at this machine's rates, by kind; elementwise kernels on operands from memory
    (forward, backward) or in the caches (`cached`: an optimizer's kernels over one parameter's tensors);
    allocations of at least `threshold` bytes at the first-touch rate. A precision calibrate did not
    measure runs at fp32's."""
    matmul = measured.matmul_flops_per_s
    elementwise, where = measured.elementwise_bytes_per_s, "/cached" if cached else ""
    return {
        "matmul": sum(flops / matmul.get(dtype, matmul["fp32"]) for dtype, flops in work.matmul_flops.items()),
        "attention": sum(flops / attention_rate(measured, key) for key, flops in work.attention_flops.items()),
        "elementwise": sum(size / elementwise.get(key + where, elementwise["fp32/" + key.split("/")[1] + where])
                           for key, size in work.elementwise_bytes.items()),
        "first_touch": work.first_touch_bytes(threshold) / measured.first_touch_bytes_per_s,
        "op_overhead": work.ops * measured.op_overhead_s,
    }


def _rank_parts(rank: RankEstimate, plan: Plan, measured: Measured) -> dict[str, float]:
    overhead, threshold = measured.parallel_overhead_s, mmap_threshold(plan)
    compute = {**price(rank.work or Work(), measured, threshold),
               "parallel_overhead": sum(count * overhead.get(kind, 0.0) for kind, count in rank.parallel_calls.items())}
    busy = sum(compute.values())
    optimizer = rank.optimizer_work or Work()
    dtensor_ops = optimizer.ops * overhead.get("dtensor_op", 0.0) if rank.dtensor_params else 0.0
    rates = measured.collective_bytes_per_s
    priced = {op: size for op, size in rank.collective_bytes.items() if RATE_OF.get(op) in rates}
    return {**compute, "pipeline_bubble": busy * (bubble(plan) - 1),
            "collectives": sum(size / rates[RATE_OF[op]] for op, size in priced.items()),
            "buffer_copies": sum(price(rank.buffer_work or Work(), measured, threshold).values()),
            "optimizer": sum(price(optimizer, measured, threshold, cached=True).values()) + dtensor_ops}


def predict_step_time(estimate: Estimate, plan: Plan, precision: str,
                      measured: Measured | None = None) -> StepTime | str:
    """The prediction, or one line saying why there is none."""
    if estimate.flops_per_step is None or any(rank.work is None for rank in estimate.ranks):
        return "needs the traced FLOPs (activations were not traced)"
    measured = measured or load_measured(plan.backend, plan.world_size)
    if measured is None:
        return (f"no machine profile for {plan.backend} at world size {plan.world_size} on this host"
                f" ({profile_path()}), or one an older meshyard wrote: run `meshyard calibrate --procs"
                f" {plan.world_size}`")
    per_rank = [_rank_parts(rank, plan, measured) for rank in estimate.ranks]
    slowest = max(range(len(per_rank)), key=lambda i: sum(per_rank[i].values()))
    parts = per_rank[slowest]
    compute = sum(parts[k] for k in COMPUTE)
    communication = parts["collectives"] + parts["buffer_copies"]
    total = compute + communication + parts["optimizer"]
    rate = measured.matmul_flops_per_s[precision]
    return StepTime(predicted_step_time_s=total, compute_s=compute, communication_s=communication,
                    optimizer_s=parts["optimizer"], pipeline_rank=estimate.ranks[slowest].pipeline_rank,
                    predicted_mfu=estimate.flops_per_step / (total * plan.world_size * rate),
                    profile=f"{measured.key}, {measured.threads_per_rank} thread(s) per rank,"
                            f" measured {measured.measured_at}",
                    parts={k: v for k, v in parts.items() if k != "optimizer"})
