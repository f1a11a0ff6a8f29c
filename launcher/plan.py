"""Pure planning: spec -> world size, mesh degrees, batch identity, device, memory theory. No processes.

Every value the user did not write down is recorded in `Plan.inferred`, so `meshyard plan` can say
what was chosen and why.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import Any

from launcher.allocator import allocator_env
from launcher.deepspeed_config import deepspeed_config
from launcher.errors import PlanError
from launcher.memory import theory_bytes_per_param
from launcher.spec.schema import JobSpec, ParallelSpec
from launcher.trackers import check_trackers_installed, tracker_defaults
from strategies.layers import find_layers
from strategies.layout import MeshLayout, stage_block_ranges
from strategies.model_init import INIT_HOOK

ZERO_STAGES_AVAILABLE = (1, 2, 3)


@dataclass(frozen=True)
class Plan:
    world_size: int
    nodes: int
    procs_per_node: int
    dp_degree: int
    tp_degree: int
    pp_degree: int
    strategy: str
    device: str
    backend: str
    micro_batch_size: int
    grad_accum_steps: int
    global_batch_size: int
    zero_stage: int | None = None
    dp_shard_degree: int = 1  # data-parallel ranks that shard parameters (FSDP); dp_degree / it replicate
    layout: MeshLayout | None = None  # set when the mesh has more than one axis (None: 1-D data parallel)
    deepspeed_config: dict[str, Any] | None = None  # the engine's config, when strategy is deepspeed
    model_state_theory: dict[str, float] = field(default_factory=dict)
    threads_per_rank: int = 1  # OMP_NUM_THREADS each rank gets
    allocator_env: dict[str, str] = field(default_factory=dict)  # malloc settings in every rank's environment
    inferred: tuple[str, ...] = field(default=())

    @property
    def fsdp_sharded(self) -> bool:
        """ZeRO-2/3 through FSDP2 over more than one data-parallel rank: parameters sharded, gathered per unit."""
        return self.strategy == "zero" and self.zero_stage in (2, 3) and self.dp_degree > 1

    def describe(self) -> str:
        lines = [
            f"world size       {self.world_size} = {self.nodes} node(s) x {self.procs_per_node} process(es)",
            f"mesh             data {self.dp_degree} x tensor {self.tp_degree} x pipeline {self.pp_degree}",
            f"strategy         {self.strategy}" + (f" stage {self.zero_stage}" if self.zero_stage is not None else ""),
            f"data parallel    {self._data_parallel()}",
            f"device/backend   {self.device}/{self.backend}",
            f"threads per rank {self.threads_per_rank} (OMP_NUM_THREADS)",
            f"allocator        {' '.join(f'{k}={v}' for k, v in self.allocator_env.items()) or 'as inherited'}",
            f"global batch     {self.global_batch_size} = micro-batch {self.micro_batch_size}"
            f" x accumulation {self.grad_accum_steps} x data-parallel {self.dp_degree}",
        ]
        if self.layout is not None and self.pp_degree > 1:
            lay = self.layout
            lines.append(f"pipeline         {lay.schedule}, {lay.num_stages} stages ({lay.stages_per_rank} per rank),"
                         f" {lay.microbatches} pipeline micro-batches of {self.micro_batch_size // lay.microbatches}")
        if self.model_state_theory:
            t = self.model_state_theory
            lines.append(f"model state      {sum(t.values()):g} B/param (theory, fp32) = params {t['params']:g}"
                         f" + grads {t['grads']:g} + optimizer {t['optim']:g}")
        if self.deepspeed_config is not None:
            lines.append(f"deepspeed config {json.dumps(self.deepspeed_config, sort_keys=True)}")
        lines += [f"inferred         {note}" for note in self.inferred]
        return "\n".join(lines)

    def _data_parallel(self) -> str:
        """How gradients meet across data-parallel ranks (strategies/composed.py decides the same way)."""
        replicate = self.dp_degree // self.dp_shard_degree
        if self.dp_degree == 1:
            return "none (one data-parallel rank)"
        if self.strategy == "deepspeed":
            return f"DeepSpeed ZeRO-{self.zero_stage} over {self.dp_degree} ranks"
        if self.dp_shard_degree > 1:
            hsdp = f", HSDP: replicate {replicate} x shard {self.dp_shard_degree}" if replicate > 1 else ""
            offloaded = self.layout is not None and self.layout.offload
            offload = ", CPU offload of parameters, gradients and optimizer state" if offloaded else ""
            return f"FSDP2 fully_shard (ZeRO-{self.zero_stage}{hsdp}{offload})"
        if self.tp_degree > 1 or self.pp_degree > 1:
            return f"FSDP2 replicating over {replicate} ranks (dp_shard 1: DDP on a tensor/pipeline mesh, as HSDP)"
        return "DDP" + (" + ZeroRedundancyOptimizer (ZeRO-1)" if self.zero_stage == 1 else "")


def plan_to_json(plan: Plan) -> str:
    return json.dumps(dataclasses.asdict(plan), indent=1)


def plan_from_json(text: str) -> Plan:
    """The Plan `plan_to_json` wrote (tuples come back from JSON lists)."""
    fields = json.loads(text)
    layout = fields.pop("layout")
    if layout is not None:
        layout = MeshLayout(**{**layout, "split_points": tuple(layout["split_points"])})
    return Plan(**{**fields, "layout": layout, "inferred": tuple(fields["inferred"])})


def make_plan(spec: JobSpec, cuda_available: bool = False) -> Plan:
    """Map the spec onto processes and a mesh, or raise a PlanError naming what to change."""
    inferred: list[str] = []
    res, par = spec.resources, spec.parallel
    world = res.nodes * res.procs_per_node

    model_degree = par.tensor * par.pipeline
    if par.data == -1:
        if world % model_degree:
            raise PlanError(
                f"parallel: tensor {par.tensor} x pipeline {par.pipeline} does not divide the world size {world}"
            )
        dp = world // model_degree
        inferred.append(f"parallel.data = {dp} (-1: world size {world} / tensor {par.tensor}"
                        f" / pipeline {par.pipeline})")
    else:
        dp = par.data
        if dp * model_degree != world:
            raise PlanError(
                f"parallel: data {dp} x tensor {par.tensor} x pipeline {par.pipeline} = {dp * model_degree}"
                f" does not equal the world size {world} (resources.nodes x resources.procs_per_node);"
                " set parallel.data: -1 to use the rest"
            )

    strategy: str = spec.strategy.name
    if strategy == "auto":
        strategy = "single" if world == 1 else "ddp"
        inferred.append(f"strategy.name = {strategy} (auto, world size {world})")
    if strategy == "single" and world != 1:
        raise PlanError(f"strategy.name=single runs one process, but the world size is {world}; use ddp or auto")
    stage = spec.strategy.stage
    if strategy == "zero" and stage not in ZERO_STAGES_AVAILABLE:
        raise PlanError(f"strategy.stage={stage}: ZeRO stage {stage} is not available yet; allowed: 1, 2, 3")
    if model_degree > 1 and (strategy == "deepspeed" or (strategy == "zero" and stage == 1)):
        name = "deepspeed" if strategy == "deepspeed" else "zero stage 1"
        raise PlanError(f"strategy.name={name} with parallel.tensor={par.tensor}, parallel.pipeline={par.pipeline}:"
                        " not supported; use ddp or auto, or zero stage 2 or 3 (FSDP2 composes with them)")
    if model_degree > 1 and (spec.strategy.find_unused_parameters or spec.strategy.static_graph):
        raise PlanError(f"strategy.find_unused_parameters/static_graph with parallel.tensor={par.tensor},"
                        f" parallel.pipeline={par.pipeline}: they configure DDP, and data parallel on a mesh with"
                        " tensor or pipeline parallel is FSDP2; remove them")
    shard = _data_shard_degree(spec, strategy, stage, dp, inferred)
    layout = None
    if model_degree > 1 or 1 < shard < dp:
        layout = _mesh_layout(spec, dp, shard, inferred)

    if model_degree > 1 and (spec.compression.prune is not None or spec.compression.distill is not None):
        raise PlanError("compression with parallel.tensor or parallel.pipeline > 1 is not supported yet;"
                        " use data parallel (ddp or zero)")
    ds_config = _deepspeed_plan(spec, dp) if strategy == "deepspeed" else None
    if spec.compression.distill is not None and (spec.data.feed != "positional" or spec.loss == "model"):
        raise PlanError("compression.distill needs (input, target) samples and a loss function: data.feed=positional"
                        " and a loss other than model")

    if spec.compression.prune is not None and strategy == "zero" and stage in (2, 3):
        raise PlanError(f"compression.prune with strategy zero stage {stage}: pruning sharded weights is not"
                        " supported yet; use ddp or zero stage 1")

    device = res.device
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
        inferred.append(f"resources.device = {device} (auto: CUDA {'found' if cuda_available else 'not found'})")
    elif device == "cuda" and not cuda_available:
        raise PlanError("resources.device=cuda but no CUDA device is visible; use cpu or auto")
    backend = "nccl" if device == "cuda" else "gloo"
    if _offloads(spec, device, dp, inferred):
        layout = dataclasses.replace(layout or _mesh_layout(spec, dp, shard, inferred), offload=True)
    if spec.training.precision == "bf16" and _uses_fsdp(strategy, dp, shard, model_degree):
        inferred.append("training.precision = bf16 under FSDP2: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype="
                        "fp32), no autocast; the sharded weights and the optimizer state stay fp32")
    _check_layer_options(spec, strategy, device)

    if spec.training.stop_at_step is not None and spec.training.stop_at_step > spec.training.max_steps:
        raise PlanError(
            f"training.stop_at_step={spec.training.stop_at_step} is past training.max_steps={spec.training.max_steps}"
        )

    check_trackers_installed(spec.observe)
    inferred += tracker_defaults(spec.observe)
    _check_profile(spec, world)
    threads = threads_per_rank(res.procs_per_node, inferred)
    micro, accum = spec.data.micro_batch_size, spec.training.grad_accum_steps
    return Plan(
        world_size=world, nodes=res.nodes, procs_per_node=res.procs_per_node,
        dp_degree=dp, dp_shard_degree=shard, tp_degree=par.tensor, pp_degree=par.pipeline, strategy=strategy,
        device=device, backend=backend, micro_batch_size=micro, grad_accum_steps=accum,
        global_batch_size=micro * accum * dp, zero_stage=stage, layout=layout, deepspeed_config=ds_config,
        # per rank, as a fraction of the whole model: with tensor or pipeline parallel a rank holds a part of it
        model_state_theory={} if model_degree > 1 else theory_bytes_per_param(
            strategy, stage, shard if strategy == "zero" and stage in (2, 3) else dp, spec.optimizer),
        threads_per_rank=threads, allocator_env=allocator_env(device, inferred), inferred=tuple(inferred),
    )


def _uses_fsdp(strategy: str, dp: int, shard: int, model_degree: int) -> bool:
    """Whether FSDP2 wraps the model (strategies/composed.py decides the same way): ZeRO-2/3, or data
    parallel on a mesh with tensor or pipeline parallel."""
    return strategy in ("ddp", "zero") and dp > 1 and (shard > 1 or model_degree > 1)


def _offloads(spec: JobSpec, device: str, dp: int, inferred: list[str]) -> bool:
    """`strategy.offload: cpu` (zero stage 3, the schema checks): FSDP2's CPUOffloadPolicy on CUDA; on a
    CPU device accepted and said to be a no-op, so one spec runs on a laptop and on a GPU cluster."""
    if spec.strategy.offload == "none":
        return False
    if device != "cuda":
        inferred.append(f"strategy.offload = cpu is a no-op on device {device}: parameters, gradients and optimizer"
                        " state live in host memory already")
        return False
    if dp == 1:
        raise PlanError("strategy.offload=cpu with one data-parallel rank: ZeRO-3 shards nothing there, so nothing"
                        " would be offloaded; use 2 or more data-parallel ranks, or offload: none")
    return True


def _check_layer_options(spec: JobSpec, strategy: str, device: str) -> None:
    """Activation checkpointing and compile: where they cannot apply, and compile's C++ compiler."""
    training = spec.training
    asked = [f"training.activation_checkpointing={training.activation_checkpointing}"
             ] if training.activation_checkpointing != "none" else []
    asked += ["training.compile=true"] if training.compile else []
    if asked and strategy == "deepspeed":
        raise PlanError(f"{' and '.join(asked)} with strategy deepspeed: not applied to DeepSpeed's engine (its ZeRO-3"
                        " fetches parameters in its own module hooks, and its activation checkpointing and compile are"
                        " its own); use strategy zero (FSDP2) or ddp, or turn them off")
    if training.compile and device == "cpu":
        from strategies.compilation import missing_cpp_compiler

        missing = missing_cpp_compiler()
        if missing is not None:
            raise PlanError(f"training.compile=true: torch.compile (inductor) builds C++ kernels on CPU, but {missing}"
                            " is not on PATH; install one (apt-get install g++) or point CXX at it, or set"
                            " training.compile: false")


def _check_profile(spec: JobSpec, world: int) -> None:
    profile = spec.observe.profile
    if profile is None:
        return
    outside = [rank for rank in profile.ranks if rank >= world]
    if outside:
        raise PlanError(f"observe.profile.ranks: {outside} not in the world of {world} rank(s) (0..{world - 1})")
    if profile.steps[1] > spec.training.max_steps:
        raise PlanError(f"observe.profile.steps: step {profile.steps[1]} is past training.max_steps"
                        f"={spec.training.max_steps}")


def threads_per_rank(procs_per_node: int, inferred: list[str]) -> int:
    """The user's OMP_NUM_THREADS if set; else this machine's cores shared by its ranks (at least 1)."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    threads = max(1, (os.cpu_count() or 1) // procs_per_node)
    inferred.append(f"OMP_NUM_THREADS = {threads} (not set: {os.cpu_count()} cores / {procs_per_node}"
                    " process(es) per node)")
    return threads


def _deepspeed_plan(spec: JobSpec, dp: int) -> dict[str, Any]:
    """DeepSpeed's config, after refusing what its engine cannot do the way the loop promises."""
    if importlib.util.find_spec("deepspeed") is None:
        raise PlanError("strategy.name=deepspeed: the deepspeed package is not installed;"
                        " pip install 'meshyard[deepspeed]' (through constraints.txt), or use strategy zero")
    if spec.compression.prune is not None:
        raise PlanError("compression.prune with strategy deepspeed: masks would bypass the engine's parameter"
                        " partitions; use ddp or zero stage 1")
    if spec.model.init == "meta":
        raise PlanError("model.init=meta with strategy deepspeed: deepspeed.zero.Init would partition each module"
                        " before the init hook runs; use model.init: constructor")
    if spec.training.on_nonfinite == "skip":
        raise PlanError("training.on_nonfinite=skip with strategy deepspeed: the engine cannot drop an accumulated"
                        " window; use stop")
    if spec.checkpoint.async_save:
        raise PlanError("checkpoint.async_save with strategy deepspeed: the engine writes its own checkpoints"
                        " synchronously; set it to false")
    return deepspeed_config(spec, dp)



def _data_shard_degree(spec: JobSpec, strategy: str, stage: int | None, dp: int, inferred: list[str]) -> int:
    """How many of the dp data-parallel ranks shard the parameters (FSDP); the rest replicate (HSDP)."""
    replicate, shard = spec.parallel.data_replicate, spec.parallel.data_shard
    if not (strategy == "zero" and stage in (2, 3)):
        named = f"strategy {strategy}" + (f" stage {stage}" if stage else "")
        what = ("DeepSpeed shards over every data-parallel rank" if strategy == "deepspeed"
                else f"{named} replicates over every data-parallel rank")
        if shard not in (None, 1):
            raise PlanError(f"parallel.data_shard={shard}: {what}; sharding over some of them (HSDP) needs strategy"
                            " zero stage 2 or 3")
        if replicate not in (None, dp):
            raise PlanError(f"parallel.data_replicate={replicate}: {what}, so it must equal parallel.data = {dp}")
        return 1
    if shard is None and replicate is None:
        if dp > 1:
            inferred.append(f"parallel.data_shard = {dp} (zero stage {stage}: shard over every data-parallel rank)")
        return dp
    for name, given in (("data_replicate", replicate), ("data_shard", shard)):
        if given is not None and dp % given:
            raise PlanError(f"parallel.{name}={given} does not divide parallel.data = {dp}")
    if shard is None:
        shard = dp // (replicate or 1)
        inferred.append(f"parallel.data_shard = {shard} (parallel.data {dp} / data_replicate {replicate})")
    if replicate is None:
        replicate = dp // shard
        inferred.append(f"parallel.data_replicate = {replicate} (parallel.data {dp} / data_shard {shard})")
    if replicate * shard != dp:
        raise PlanError(f"parallel: data_replicate {replicate} x data_shard {shard} = {replicate * shard} does not"
                        f" equal parallel.data = {dp}")
    if shard == 1 and dp > 1:
        raise PlanError(f"parallel.data_shard=1 with strategy zero stage {stage}: nothing would be sharded; use"
                        " strategy ddp, or data_shard above 1")
    return shard


def _mesh_layout(spec: JobSpec, dp: int, shard: int, inferred: list[str]) -> MeshLayout:
    """The mesh and pipeline settings, with the rules torch's schedules enforce checked up front."""
    par: ParallelSpec = spec.parallel
    micro = spec.data.micro_batch_size
    microbatches = par.microbatches or par.pipeline
    if par.pipeline == 1:
        if par.microbatches is not None or par.split_points or par.stages_per_rank > 1:
            inferred.append("parallel.microbatches/stages_per_rank/split_points ignored (parallel.pipeline = 1)")
        microbatches = 1
    else:
        if par.microbatches is None:
            inferred.append(f"parallel.microbatches = {microbatches} (null: the pipeline degree)")
        if micro % microbatches:
            raise PlanError(f"parallel.microbatches={microbatches} does not divide data.micro_batch_size={micro};"
                            " each micro-batch is split into that many equal pipeline micro-batches")
        if par.schedule == "1f1b" and microbatches < par.pipeline:
            raise PlanError(f"parallel.microbatches={microbatches}: schedule 1f1b needs at least parallel.pipeline"
                            f"={par.pipeline} pipeline micro-batches")
        if par.schedule == "interleaved_1f1b" and microbatches % par.pipeline:
            raise PlanError(f"parallel.microbatches={microbatches}: schedule interleaved_1f1b needs a multiple of"
                            f" parallel.pipeline={par.pipeline}")
    return MeshLayout(dp_degree=dp, dp_shard_degree=shard, tp_degree=par.tensor, pp_degree=par.pipeline,
                      schedule=par.schedule,
                      microbatches=microbatches, stages_per_rank=par.stages_per_rank if par.pipeline > 1 else 1,
                      split_points=tuple(par.split_points) if par.pipeline > 1 else (), tp_plan=par.tp_plan,
                      layers=spec.model.layers)


def check_model_layout(spec: JobSpec, plan: Plan) -> None:
    """Checks that need the model, built on the meta device (no memory, no init): the init hook of
    `model.init: meta`, the repeated layers that FSDP wraps and pipeline stages split, the
    tensor-parallel plan, attention heads divisible by the tensor degree."""
    layout = plan.layout
    sharded = plan.strategy == "zero" and plan.zero_stage in (2, 3)
    wraps_layers = spec.training.activation_checkpointing != "none" or spec.training.compile
    if layout is None and not sharded and spec.model.init == "constructor" and not wraps_layers:
        return
    model = meta_model(spec)
    if spec.model.init == "meta" and not callable(getattr(model, INIT_HOOK, None)):
        raise PlanError(f"model.init=meta: {type(model).__name__} ({spec.model.target}) declares no {INIT_HOOK}(module)"
                        " hook to initialize a meta-built model; add one, or use model.init: constructor")
    try:
        layers = find_layers(model, spec.model.layers)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    if wraps_layers and layers is None:
        which = "activation_checkpointing" if spec.training.activation_checkpointing != "none" else "compile"
        raise PlanError(f"training.{which}: applies to each repeated layer, but the model ({spec.model.target}) has"
                        " no list of repeated layers (an nn.ModuleList of one class); name it with model.layers")
    if layout is None:
        return
    if layout.pp_degree > 1:
        _check_pipeline(spec, layout, model, layers)
    if layout.tp_degree > 1:
        _check_tensor_parallel(spec, layout, model)


def meta_model(spec: JobSpec) -> Any:
    import torch

    from launcher.components import model_factory

    try:
        with torch.device("meta"):
            return model_factory(spec.model)()
    except Exception as exc:  # a constructor that cannot run on the meta device
        raise PlanError(f"model.target={spec.model.target}: building it on the meta device (to check the layout"
                        f" and estimate the cost before launch) failed: {type(exc).__name__}: {exc}") from None


def _check_pipeline(spec: JobSpec, layout: MeshLayout, model: Any, layers: tuple[str, Any] | None) -> None:
    from strategies.pipeline import check_pipeline_model

    if layers is None:
        raise PlanError(f"parallel.pipeline={layout.pp_degree}: the model ({spec.model.target}) has no list of repeated"
                        " layers (an nn.ModuleList) for pipeline stages to split; name it with model.layers")
    path, blocks = layers
    try:  # built-in models (forward skips None modules) or the HF causal LMs strategies/pipeline.py knows
        check_pipeline_model(model, path, spec.loss == "model", spec.data.feed, layout.pp_degree)
        stage_block_ranges(len(blocks), layout.num_stages, layout.split_points, path)
    except ValueError as exc:
        raise PlanError(str(exc)) from None


def _check_tensor_parallel(spec: JobSpec, layout: MeshLayout, model: Any) -> None:
    import torch

    from strategies.tensor_parallel import resolve_tp_plan, tp_targets

    if layout.tp_plan is None and not getattr(model, "tp_plan", None):
        raise PlanError(f"parallel.tensor={layout.tp_degree}: the model ({spec.model.target}) declares no"
                        " tp_plan; give parallel.tp_plan (module path -> colwise|rowwise)")
    targets = tp_targets(model, resolve_tp_plan(model, layout.tp_plan))
    if not targets:
        raise PlanError(f"parallel.tensor={layout.tp_degree}: the tensor-parallel plan matches no nn.Linear of"
                        f" the model ({spec.model.target}); plan patterns are module paths such as blocks.*.fc1")
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, torch.nn.Linear):
            raise PlanError(f"parallel.tensor={layout.tp_degree}: {name} is a {type(module).__name__}; tensor"
                            " parallel shards nn.Linear layers only (GPT-2's Conv1D stores its weight transposed)")
    heads = getattr(model, "n_heads", None) or getattr(getattr(model, "config", None), "num_attention_heads", None)
    kv_heads = getattr(getattr(model, "config", None), "num_key_value_heads", None)
    for what, count in (("attention heads", heads), ("key/value heads", kv_heads)):
        if isinstance(count, int) and count % layout.tp_degree:
            raise PlanError(f"parallel.tensor={layout.tp_degree} does not divide the model's {count} {what}"
                            f" ({spec.model.target}); use a divisor of {count}")
