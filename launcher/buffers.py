"""What the strategies do around each collective, per step of one rank, as Work (launcher/opcount.py):
the copies into and out of their communication buffers, and the buffers they allocate anew.

DDP (and ZeRO-1, DeepSpeed stage 0) copies gradients into a bucket, divides it by the world size
and copies it back: 3 passes of a read and a write over buckets it keeps. DeepSpeed stages 1-3
copy in and out of flat buffers it keeps (a pass over the payload, one over a 1/dp shard). FSDP2
(ZeRO-2/3) allocates for every unit and gather: the all-gather output (the unit's parameters in the
gathered dtype, flat), into which it copies the local shard, and each unsharded parameter, into
which it copies its part of that output; for every reduce-scatter: the flat input, into which it
copies the unit's gradients, and the reduced shard. Tensor parallel's functional all-reduce writes
a new output of each all-reduced activation. Broadcast and send/recv work in place or on buffers
kept from step to step. Allocations are what the predicted step time prices at the first-touch
rate where glibc maps them anew (launcher/allocator.py).
"""
from __future__ import annotations

from collections import defaultdict

from launcher.opcount import Work
from launcher.plan import Plan
from launcher.shards import PartCounts


def buffer_work(plan: Plan, counts: PartCounts, collectives: dict[str, int], gathered_bytes: int,
                tp_call_bytes: int) -> Work:
    """`collectives`: payload per step by collective (launcher/estimate.py); `gathered_bytes`: bytes per
    parameter element FSDP2 gathers (2 under the bf16 policy); `tp_call_bytes`: one tensor-parallel
    all-reduce's payload."""
    dp = plan.dp_degree
    light: dict[str, float] = defaultdict(float)
    allocated: dict[str, float] = defaultdict(float)
    for op, payload in collectives.items():
        if op == "all_reduce":
            light["fp32/light"] += 6 * payload
        elif op == "all_reduce_tp":
            light["fp32/light"] += 2 * payload
            allocated[str(tp_call_bytes)] += payload
        elif op in ("all_gather", "reduce_scatter") and not plan.fsdp_sharded:
            light["fp32/light"] += (2 + 2 / dp) * payload
    if plan.fsdp_sharded:
        kind = "bf16/light" if gathered_bytes == 2 else "fp32/light"
        for index, sizes in enumerate(counts.units):
            root = index == len(counts.units) - 1
            gathers = plan.grad_accum_steps * (1 if plan.zero_stage == 2 or root else 2)  # ZeRO-3: again in backward
            unit, grads = sum(sizes) * gathered_bytes, sum(sizes) * 4
            light[kind] += gathers * (2 * unit / dp + 2 * unit)
            light["fp32/light"] += 2 * grads + 2 * grads / dp
            for size in (unit, *(s * gathered_bytes for s in sizes)):
                allocated[str(size)] += gathers * size
            for size in (grads, -(-grads // dp)):
                allocated[str(size)] += size
    return Work(elementwise_bytes=dict(light), allocated_bytes=dict(allocated))
