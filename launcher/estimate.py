"""What one training step will cost each rank, known before launch: `meshyard plan`'s estimate.

Computed with no process and no real memory: the model is built on the meta device (parameter
counts per rank, launcher/shards.py) and one micro-batch of the training set is traced on fake
tensors (activations, FLOPs, the tensors collectives move; launcher/trace.py). Bytes per element
follow launcher/memory.py's theory (fp32 weights and gradients; DeepSpeed bf16 keeps bf16 weights
and gradients plus an fp32 master copy in its optimizer). What is and is not counted: docs/planning.md.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from launcher.buffers import buffer_work
from launcher.memory import optimizer_state_bytes_per_param
from launcher.opcount import Work, optimizer_work
from launcher.plan import Plan
from launcher.recompute import Recompute, recompute
from launcher.shards import PartCounts, ceil_div, count_part, pipeline_parts
from launcher.spec.schema import JobSpec
from launcher.trace import NotTraced, Trace, one_line
from strategies.layout import stage_block_ranges


class EstimateUnavailable(Exception):
    """The model cannot even be built on the meta device, so nothing can be counted."""


@dataclass(frozen=True)
class RankEstimate:
    """Rank 0 of one pipeline rank's data x tensor group (the largest shards); every rank without a pipeline."""

    pipeline_rank: int
    stages: tuple[int, ...]
    params: int  # parameter elements held at rest
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int | None  # None: not traced
    micro_batches_in_flight: int
    buffer_bytes: int  # communication buffers (buckets, all-gathered parameters, pipeline receive buffers)
    flops_per_step: int | None
    collective_bytes: dict[str, int] = field(default_factory=dict)  # payload per step, by collective
    work: Work | None = None  # kernels of its forwards and backwards per step (launcher/opcount.py); None: not traced
    optimizer_work: Work | None = None  # kernels of its optimizer step over the parameters it updates
    buffer_work: Work | None = None  # copies into and out of communication buffers, and their allocations
    # per step: tensor-parallel linears run ("tp_linear") and FSDP2 units gathered ("fsdp_unit"), each
    # forward and backward of one micro-batch; and whether its parameters are DTensors (FSDP2, tensor parallel)
    parallel_calls: dict[str, int] = field(default_factory=dict)
    dtensor_params: bool = False
    # Gradients are freed after every step (zero_grad(set_to_none=True)) and grow in backward as the
    # activations are freed, so the two coexist only when gradients outlive a micro-batch:
    # accumulation, or a pipeline holding later micro-batches' activations after an earlier backward.
    grads_meet_activations: bool = False

    @property
    def peak_bytes(self) -> int:
        activations = self.activation_bytes or 0
        live = (activations + self.grad_bytes if self.grads_meet_activations
                else max(activations, self.grad_bytes))
        return self.param_bytes + self.optimizer_bytes + self.buffer_bytes + live

    def describe(self, pipelined: bool) -> list[str]:
        who = "every rank" if not pipelined else f"pipeline rank {self.pipeline_rank}" + (
            f" (stages {', '.join(map(str, self.stages))})" if len(self.stages) > 1 else "")
        activations = ("not traced" if self.activation_bytes is None else
                       f"{human_bytes(self.activation_bytes)} ({self.micro_batches_in_flight} in flight)")
        moved = [f"{op} {human_bytes(size)}" for op, size in self.collective_bytes.items()] or ["no collectives"]
        flops = "" if self.flops_per_step is None else f"; {self.flops_per_step:.3g} FLOPs"
        live = (f"grads {human_bytes(self.grad_bytes)} + activations {activations}" if self.grads_meet_activations
                else f"max(grads {human_bytes(self.grad_bytes)}, activations {activations})")
        return [f"{who:<16} {self.params:,} params: params {human_bytes(self.param_bytes)} + optimizer"
                f" {human_bytes(self.optimizer_bytes)} + buffers {human_bytes(self.buffer_bytes)} + {live}"
                f" = peak {human_bytes(self.peak_bytes)}",
                f"{'':<16} per step: " + ", ".join(moved) + flops]


@dataclass(frozen=True)
class Estimate:
    total_params: int
    ranks: tuple[RankEstimate, ...]
    traced_samples: int  # samples in the traced forward (a pipeline micro-batch under a pipeline)
    flops_per_step: int | None  # model FLOPs of one optimizer step, all ranks together
    not_traced: str | None = None  # why activations and FLOPs are missing

    @property
    def predicted_peak_bytes_per_rank(self) -> int:
        return max(rank.peak_bytes for rank in self.ranks)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "predicted_peak_bytes_per_rank": self.predicted_peak_bytes_per_rank,
                "ranks": [{**asdict(r), "peak_bytes": r.peak_bytes} for r in self.ranks]}

    def describe(self) -> str:
        how = (f"one micro-batch of {self.traced_samples} traced on fake tensors" if self.not_traced is None
               else f"activations: not traced ({self.not_traced})")
        lines = [f"estimate         no processes: model on the meta device; {how}",
                 f"parameters       {self.total_params:,} in the model"]
        for rank in self.ranks:
            lines += rank.describe(len(self.ranks) > 1)
        if self.flops_per_step is not None:
            lines.append(f"FLOPs per step   {self.flops_per_step:.3g} (all ranks, forward + backward)")
        lines.append(f"predicted peak   {human_bytes(self.predicted_peak_bytes_per_rank)} per rank (model state,"
                     " activations and buffers; the process's own torch/Python footprint not included)")
        return "\n".join(lines)


def human_bytes(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def element_bytes(spec: JobSpec, plan: Plan) -> tuple[int, int, int]:
    """Bytes per parameter element of (weights, gradients, optimizer state)."""
    o = optimizer_state_bytes_per_param(spec.optimizer)
    if plan.strategy == "deepspeed" and spec.training.precision == "bf16":
        return 2, 2, o + 4  # bf16 weights and gradients, fp32 master weights in the optimizer
    return 4, 4, o


def gathered_bytes(spec: JobSpec, plan: Plan) -> int:
    """Bytes per element of the parameters ZeRO-2/3 gathers: FSDP2's bf16 MixedPrecisionPolicy
    gathers them in bf16 (strategies/fsdp.py), otherwise as stored."""
    if plan.fsdp_sharded and spec.training.precision == "bf16":
        return 2
    return element_bytes(spec, plan)[0]


def model_state(spec: JobSpec, plan: Plan, counts: PartCounts) -> dict[str, Any]:
    """Bytes of weights, gradients, optimizer state and communication buffers of one rank, and the
    payload its collectives move per step (the activation-sized parts come from the trace)."""
    pb, gb, ob = element_bytes(spec, plan)
    full, accum, dp = counts.local, plan.grad_accum_steps, plan.dp_degree
    p_full, g_full = full * pb, full * gb
    ab = gathered_bytes(spec, plan)
    stage = plan.zero_stage or 0
    # "stepped": the elements of each parameter tensor this rank's optimizer updates
    replicated = {"params": full, "param_bytes": p_full, "grad_bytes": g_full, "optimizer_bytes": full * ob,
                  "stepped": counts.sizes}
    if plan.strategy == "single" or dp == 1:
        return {**replicated, "buffer_bytes": 0, "collectives": {}}
    if plan.strategy == "ddp" or (plan.strategy == "deepspeed" and stage == 0):
        # DDP's 25 MiB buckets together hold a copy of every gradient (gradient_as_bucket_view is off);
        # replication on a tensor/pipeline mesh (FSDP2 over a shard degree of 1) all-reduces as much.
        # HSDP (zero with parallel.data_replicate > 1) is estimated as sharding over all of dp: not yet exact.
        return {**replicated, "buffer_bytes": g_full, "collectives": {"all_reduce": g_full}}
    if plan.strategy == "zero" and stage == 1:
        return {**replicated, "optimizer_bytes": counts.zero1_partition * ob, "buffer_bytes": g_full,
                "stepped": counts.zero1_sizes,
                "collectives": {"all_reduce": g_full, "broadcast": p_full}}
    shard = counts.fsdp_shard if plan.strategy == "zero" else ceil_div(full, dp)
    # Under accumulation FSDP2 keeps unsharded gradients between micro-batches (no sync until the last).
    grads = shard * gb + (g_full if accum > 1 and plan.strategy == "zero" else 0)
    largest = max(counts.layers, default=0)
    root = full - sum(counts.layers)
    if stage == 2 and plan.strategy == "zero":
        # parameters stay unsharded from forward to the end of backward; one layer's gradient before reduce-scatter
        return {"params": shard, "param_bytes": shard * pb, "grad_bytes": grads, "optimizer_bytes": shard * ob,
                "stepped": counts.fsdp_sizes, "buffer_bytes": full * ab + largest * gb,
                "collectives": {"all_gather": accum * full * ab, "reduce_scatter": g_full}}
    if stage == 3:
        # the root's parameters (not resharded after forward) and the largest layer's, gathered; its gradient
        return {"params": shard, "param_bytes": shard * pb, "grad_bytes": grads, "optimizer_bytes": shard * ob,
                # FSDP2 steps a shard of every tensor, DeepSpeed one flat partition
                "stepped": counts.fsdp_sizes if plan.strategy == "zero" else (shard,),
                "buffer_bytes": (root + largest) * ab + max(root, largest) * gb,
                "collectives": {"all_gather": accum * (2 * (full - root) + root) * ab, "reduce_scatter": g_full}}
    # DeepSpeed stages 1 and 2: flat optimizer (and stage 2 gradient) partitions, gradient-sized buckets
    return {**replicated, "optimizer_bytes": shard * ob, "stepped": (shard,),
            "grad_bytes": shard * gb if stage == 2 else g_full,
            "buffer_bytes": g_full, "collectives": {"reduce_scatter": g_full, "all_gather": p_full}}


def _stage_segments(plan: Plan, num_layers: int) -> list[list[int]]:
    """Trace segments of each pipeline stage: [before the layers, layer 0 .. n-1, after the layers]."""
    if plan.layout is None or plan.pp_degree == 1:
        return [list(range(num_layers + 2))]
    layout = plan.layout
    ranges = stage_block_ranges(num_layers, layout.num_stages, layout.split_points)
    last = layout.num_stages - 1
    return [([0] if s == 0 else []) + [i + 1 for i in blocks] + ([num_layers + 1] if s == last else [])
            for s, blocks in enumerate(ranges)]


def pipeline_microbatches(plan: Plan) -> int:
    """Pipeline micro-batches each micro-batch of the spec is cut into (1 without a pipeline)."""
    return plan.layout.microbatches if plan.layout is not None and plan.pp_degree > 1 else 1


def in_flight(plan: Plan, pipeline_rank: int) -> int:
    """Micro-batches (pipeline chunks) whose activations one rank holds at once."""
    layout = plan.layout
    if layout is None or plan.pp_degree == 1:
        return 1
    m, p, v = layout.microbatches, layout.pp_degree, layout.stages_per_rank
    if layout.schedule == "gpipe":
        return m * v
    if layout.schedule == "1f1b":
        return min(m, p - pipeline_rank)
    # torch's interleaved 1F1B warm-up: (v - 1) rounds of p, plus 2 per hop from the last rank
    return min(m * v, (v - 1) * p + 2 * (p - 1 - pipeline_rank) + 1)


def traced_rank(plan: Plan, pipeline_rank: int, stages: tuple[int, ...], local: Trace, ac: Recompute) -> dict[str, Any]:
    """Activations, pipeline buffers, per-step FLOPs and activation-sized collectives of one pipeline rank
    (`ac`: activation checkpointing's saved bytes and recompute, launcher/recompute.py)."""
    n = len(local.boundary_bytes)
    segments = _stage_segments(plan, n)
    m = pipeline_microbatches(plan)
    steps = m * plan.grad_accum_steps  # traced forwards per optimizer step
    per_stage = [sum(ac.saved_bytes[i] for i in segments[s]) for s in stages]
    chunks = in_flight(plan, pipeline_rank)
    mine = [i for s in stages for i in segments[s]]
    buffers = sends = 0
    for s in stages if plan.pp_degree > 1 else ():
        layers = [i - 1 for i in segments[s] if 1 <= i <= n]
        inbound = local.boundary_bytes[layers[0] - 1] if s > 0 else 0
        outbound = local.boundary_bytes[layers[-1]] if s < len(segments) - 1 else 0
        buffers += m * (inbound + outbound)  # torch's stages allocate receive buffers for every micro-batch
        sends += steps * (inbound + outbound)  # activations forward, their gradients back
    forward = sum(local.forward_flops)
    share = sum(local.forward_flops[i] for i in mine) / forward if forward else 1.0
    collectives = {"all_reduce_tp": steps * sum(local.tp_bytes[i] for i in mine), "send_recv": sends}
    tp_linears = steps * sum(local.tp_linears[i] for i in mine)
    activations = chunks * sum(per_stage) // len(per_stage) + ac.peak_recompute_bytes(mine)
    recomputed = steps * sum(ac.recompute_flops[i] for i in mine)
    # the stage's share of the kernels (as of the FLOPs), and the checkpointed layers' forwards again
    work = local.work.scaled(share * steps) + sum((ac.recompute_work[i] for i in mine), Work()).scaled(steps)
    return {"activation_bytes": activations, "micro_batches_in_flight": chunks,
            "buffer_bytes": buffers, "flops_per_step": int(local.flops * share * steps) + recomputed,
            "work": work, "parallel_calls": {"tp_linear": tp_linears} if tp_linears else {},
            "tp_call_bytes": collectives["all_reduce_tp"] // tp_linears if tp_linears else 0,
            "collectives": {op: size for op, size in collectives.items() if size}}


# Traces already made, by (tensor degree, traced samples): candidates that differ only in how they
# shard model state, or in pipeline depth at the same micro-batch, trace the same (auto, launcher/candidates.py).
TraceCache = dict[tuple[int, int], "tuple[Trace, Trace] | str"]


def build_estimate(spec: JobSpec, plan: Plan, train_set: Any, trace: bool = True,
                   traces: TraceCache | None = None) -> Estimate:
    """The estimate for `plan`, tracing a micro-batch of `train_set`'s first samples (trace=False: model
    state only, without the ~1 s that importing the fake-tensor machinery costs a process; `traces`:
    reuse and keep the traces of other plans of the same spec)."""
    from launcher.errors import PlanError
    from launcher.plan import meta_model
    from strategies.layers import find_layers

    try:
        model = meta_model(spec)
    except PlanError as exc:
        raise EstimateUnavailable(str(exc)) from None
    try:
        path, layers = find_layers(model, spec.model.layers) or (None, None)
    except ValueError:  # several layer lists and none named: no layer boundaries (no pipeline, no FSDP units)
        path, layers = None, None
    tp_styles = _tp_styles(model, plan)
    parts = [count_part(stages, part, layers, tp_styles, plan.tp_degree, plan.dp_degree)
             for stages, part in pipeline_parts(model, plan.layout, path)]
    total = sum(p.numel() for p in model.parameters())
    m = pipeline_microbatches(plan)
    samples = plan.micro_batch_size // m
    cache = traces if traces is not None else {}
    key = (plan.tp_degree, samples)
    if trace and key not in cache:
        cache[key] = _trace_or_why(spec, plan, model, layers, tp_styles, train_set, samples)
    traced = cache[key] if trace else "not asked for"
    full, local = (None, None) if isinstance(traced, str) else traced
    ranks = tuple(_rank_estimate(spec, plan, rank, counts, local) for rank, counts in enumerate(parts))
    flops = None if full is None else full.flops * m * plan.grad_accum_steps * plan.dp_degree
    return Estimate(total_params=total, ranks=ranks, traced_samples=samples, flops_per_step=flops,
                    not_traced=traced if isinstance(traced, str) else None)


def _trace_or_why(spec: JobSpec, plan: Plan, model: Any, layers: Any, tp_styles: dict[str, str], train_set: Any,
                  samples: int) -> tuple[Trace, Trace] | str:
    from launcher.components import build_collate, build_loss

    try:
        batch = _sample_batch(train_set, samples, build_collate(spec.data) or _default_collate)
        return _traces(spec, plan, model, layers, tp_styles, batch, build_loss(spec.loss))
    except NotTraced as exc:
        return str(exc)


def _rank_estimate(spec: JobSpec, plan: Plan, rank: int, counts: PartCounts, local: Trace | None) -> RankEstimate:
    state = model_state(spec, plan, counts)
    ac = spec.training.activation_checkpointing
    traced = traced_rank(plan, rank, counts.stages, local, recompute(local, ac)) if local is not None else {
        "activation_bytes": None, "micro_batches_in_flight": in_flight(plan, rank), "buffer_bytes": 0,
        "flops_per_step": None, "work": None, "parallel_calls": {}, "tp_call_bytes": 0, "collectives": {}}
    steps = plan.grad_accum_steps * pipeline_microbatches(plan)
    # FSDP2 units: each layer it holds and the root, gathered (and reduce-scattered) for every micro-batch
    units = {"fsdp_unit": (len(counts.layers) + 1) * steps} if plan.fsdp_sharded else {}
    calls = {**traced["parallel_calls"], **units}
    collectives = {op: state["collectives"].get(op, 0) + traced["collectives"].get(op, 0)
                   for op in (*state["collectives"], *traced["collectives"])}
    return RankEstimate(
        pipeline_rank=rank, stages=counts.stages, params=state["params"], param_bytes=state["param_bytes"],
        grad_bytes=state["grad_bytes"], optimizer_bytes=state["optimizer_bytes"],
        activation_bytes=traced["activation_bytes"], micro_batches_in_flight=traced["micro_batches_in_flight"],
        buffer_bytes=state["buffer_bytes"] + traced["buffer_bytes"], flops_per_step=traced["flops_per_step"],
        collective_bytes=collectives, work=traced["work"],
        optimizer_work=optimizer_work(spec.optimizer, state["stepped"]),
        buffer_work=buffer_work(plan, counts, collectives, gathered_bytes(spec, plan), traced["tp_call_bytes"]),
        parallel_calls=calls, dtensor_params=plan.fsdp_sharded or plan.tp_degree > 1,
        grads_meet_activations=plan.grad_accum_steps > 1 or plan.pp_degree > 1)


def _sample_batch(train_set: Any, samples: int, collate: Any) -> Any:
    try:
        return collate([train_set[i] for i in range(samples)])
    except Exception as exc:  # the user's dataset or collate function
        raise NotTraced(f"reading {samples} samples: {one_line(exc)}") from None


def _default_collate(samples: list[Any]) -> Any:
    from torch.utils.data import default_collate

    return default_collate(samples)


def _tp_styles(model: Any, plan: Plan) -> dict[str, str]:
    if plan.layout is None or plan.tp_degree == 1:
        return {}
    from strategies.tensor_parallel import resolve_tp_plan, tp_targets

    return tp_targets(model, resolve_tp_plan(model, plan.layout.tp_plan))


def _traces(spec: JobSpec, plan: Plan, model: Any, layers: Any, tp_styles: dict[str, str], batch: Any,
            loss_fn: Any) -> tuple[Trace, Trace]:
    """(whole model: the model's FLOPs, rank-local model under tensor parallel: its activations)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from launcher.components import batch_feed
    from launcher.trace import fake_model, narrow_for_tp, trace_micro_batch

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    feed, precision = batch_feed(spec), spec.training.precision
    try:
        fake_model(model, mode)
    except Exception as exc:  # buffers or parameters the fake mode cannot make
        raise NotTraced(one_line(exc)) from None
    full = trace_micro_batch(model, batch, mode, feed, loss_fn, precision, layers, {})
    if not tp_styles:
        return full, full
    narrow_for_tp(model, tp_styles, plan.tp_degree, mode)
    return full, trace_micro_batch(model, batch, mode, feed, loss_fn, precision, layers, tp_styles)
