"""The typed job spec. Each class mirrors one section of the YAML file; unknown keys are errors.

Numbers are parsed in pydantic's lax mode because YAML 1.1 reads `1e-3` as a string; anything that
does not convert cleanly (e.g. `lr: fast`, `micro_batch_size: 4.5`) is still rejected. Two lax
conversions are refused for every section: true/false where a number is expected (lax mode would
make `max_steps: true` a 1), and non-finite numbers (`.inf`, `.nan`, "inf") in any float field.
"""
from __future__ import annotations

import types
from typing import Any, Literal, Union, cast, get_args, get_origin

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

IMPORT_PATH = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"
MAX_SEED = 2**32  # numpy's range; the sampler's seed * 1_000_003 + epoch must also fit torch's 64-bit seed
ACTIVATION_CHECKPOINTING = r"^(none|full|every_[1-9][0-9]*)$"
MAX_TIMEOUT_S = 86_400.0  # a day: longer is a typo, and some backends overflow on .inf
_BYTE_SIZE = TypeAdapter(ByteSize)


def _refuses_bool(annotation: Any) -> bool:
    """An int or float annotation (alone or in a union such as `int | None`) that does not also take bool."""
    members = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    return bool not in members and any(m in (int, float) for m in members)


class Section(BaseModel):
    """Base for every section: frozen, unknown keys rejected, no bools for numbers, finite floats only."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[cast(str, info.field_name)].annotation  # always set in a field validator
        if get_origin(annotation) in (tuple, list) and isinstance(value, (list, tuple)):  # e.g. betas
            refused = any(isinstance(v, bool) for v in value) and any(map(_refuses_bool, get_args(annotation)))
        else:
            refused = isinstance(value, bool) and _refuses_bool(annotation)
        if refused:
            raise PydanticCustomError("bool_for_number", "Input should be a number, not true or false")
        return value


class ComponentSpec(Section):
    """A user or built-in factory named by an import path, like Hydra's `_target_`."""

    target: str = Field(pattern=IMPORT_PATH, description='"module:callable" returning the object')
    kwargs: dict[str, Any] = Field(default_factory=dict)


class ModelSpec(ComponentSpec):
    """The user's model. Its constructor's weights are the run's starting point under every strategy."""

    init: Literal["constructor", "meta"] = Field(
        default="constructor",
        description="constructor = build with the real constructor on the CPU of every rank (weights exactly as the"
                    " constructor makes them), then shard; meta = build on the meta device and initialize module by"
                    " module with the model's own `_init_weights(module)` hook (for models too large for one host)")
    init_from: str | None = Field(
        default=None, description="a consolidated state dict (.safetensors or .pt, weights only) loaded after building")
    layers: str | None = Field(
        default=None, description="module path of the repeated layer list (e.g. model.layers, transformer.h); null ="
                                  " the one nn.ModuleList of identical blocks, found by looking")


class DataSpec(ComponentSpec):
    """A map-style Dataset; the eval split reuses `target` with `eval_kwargs`.

    A sample is an (input, target) pair fed as `model(input)` (feed: positional), or a dict fed as
    `model(**sample)` (feed: kwargs) whose `target_key` entry goes to the loss function (unless
    `loss: model`, when the model computes its own loss from the whole dict).
    """

    micro_batch_size: int = Field(gt=0, description="samples per rank per forward/backward")
    feed: Literal["positional", "kwargs"] = Field(
        default="positional", description="positional = (input, target) pairs fed as model(input); kwargs = dict"
                                          " samples fed as model(**sample)")
    target_key: str = Field(default="labels", min_length=1,
                            description="feed kwargs: the entry handed to the loss function"
                                        " (kept in the batch with loss: model)")
    collate: str | None = Field(default=None, pattern=IMPORT_PATH,
                                description='"module:callable" merging a list of samples into a batch'
                                            ' (variable-length samples)')
    shuffle: bool = True
    eval_kwargs: dict[str, Any] | None = Field(
        default=None, description="kwargs merged over `kwargs` to build the eval split; null = no eval"
    )
    num_workers: int = Field(default=0, ge=0, description="DataLoader worker processes per rank (at most 64 unless"
                                                          " the environment sets MESHYARD_MAX_NUM_WORKERS)")


class OptimizerSpec(Section):
    name: Literal["sgd", "adam", "adamw", "rmsprop"]
    lr: float = Field(gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1, description="sgd and rmsprop")
    nesterov: bool = Field(default=False, description="sgd; needs momentum > 0")
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="adam and adamw")
    eps: float = Field(default=1e-8, gt=0)
    alpha: float = Field(default=0.99, gt=0, lt=1, description="rmsprop smoothing constant")
    l1: float = Field(default=0.0, ge=0, description="adds l1 * sign(w) to each gradient per step")
    l2: float = Field(default=0.0, ge=0, description="adds 2 * l2 * w to each gradient per step")
    weight_decay: float = Field(default=0.0, ge=0, description="the optimizer's own (decoupled for adamw)")
    grad_clip: float | None = Field(default=None, gt=0, description="max global gradient norm; null = off")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError("each beta must be in [0, 1)")
        return betas

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimizerSpec:
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ValueError("nesterov: only for name sgd with momentum > 0")
        return self


class ScheduleSpec(Section):
    warmup_steps: int = Field(default=0, ge=0, description="linear warmup from lr/warmup_steps to lr")
    decay: Literal["constant", "linear", "cosine"] = "constant"
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1, description="final lr = lr * min_lr_ratio")


class TrainingSpec(Section):
    max_steps: int = Field(gt=0, description="optimizer steps; the LR schedule spans these")
    grad_accum_steps: int = Field(default=1, gt=0)
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32",
        description="bf16: where FSDP2 shards or replicates the model (zero 2/3, or data parallel on a tensor/pipeline"
                    " mesh) its MixedPrecisionPolicy: bf16 parameters and compute, fp32 gradient reduction, weights and"
                    " optimizer state; elsewhere autocast; with deepspeed its bf16 mode")
    log_every: int = Field(default=10, gt=0)
    eval_every: int = Field(default=0, ge=0, description="0 = only at the end (when an eval split exists)")
    checkpoint_every: int = Field(default=0, ge=0, description="0 = only at the end")
    stop_at_step: int | None = Field(
        default=None, gt=0, description="end this launch after this step (checkpointed); a later launch resumes"
    )
    collective_timeout_s: float = Field(
        default=300.0, gt=0, le=MAX_TIMEOUT_S,
        description="process-group timeout (at most a day); the launcher calls a job hung 20% (>= 5 s) sooner,"
                    " naming the stuck rank"
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        default="stop", description="a NaN/Inf loss or gradient: stop the run, or skip that update"
    )
    activation_checkpointing: str = Field(
        default="none", pattern=ACTIVATION_CHECKPOINTING,
        description="none, full (every repeated layer) or every_<k> (every k-th, e.g. every_2): recompute those"
                    " layers' activations in backward instead of keeping them (model.layers names the layers)")
    compile: bool = Field(default=False, description="torch.compile each repeated layer (on CPU: needs a C++"
                                                     " compiler, $CXX or g++); the first step pays the compile")


class StrategySpec(Section):
    name: Literal["auto", "single", "ddp", "zero", "deepspeed"] = Field(
        default="auto",
        description="auto = the cheapest plan (ddp, zero 1/2/3, tensor/pipeline degrees) whose predicted peak fits"
                    " resources.memory_per_rank (single for one process, ddp when it fits); zero = ZeRO sharding with"
                    " torch FSDP2/ZeroRedundancyOptimizer; deepspeed = DeepSpeed's engine",
    )
    stage: int | None = Field(default=None, ge=0, le=3,
                              description="ZeRO stage: 1-3 with name zero, 0-3 with name deepspeed")
    offload_optimizer: Literal["none", "cpu"] = Field(
        default="none", description="deepspeed only: keep optimizer state (and its step) in CPU memory")
    offload: Literal["none", "cpu"] = Field(
        default="none", description="zero stage 3 only: keep parameter shards, gradients and optimizer state (and its"
                                    " step) in CPU memory (FSDP2 CPUOffloadPolicy); on CUDA devices; a no-op on CPU"
                                    " devices, where they live in host memory already")
    config: str | None = Field(
        default=None, description="deepspeed only: a DeepSpeed JSON config merged into the one written from the"
                                  " spec (a value both set differently is an error)")
    find_unused_parameters: bool = Field(
        default=False, description="ddp and zero 1: let DDP find parameters that got no gradient (a slower backward);"
                                   " needed when some layers are skipped in forward")
    static_graph: bool = Field(
        default=False,
        description="ddp and zero 1: the set of used parameters never changes (lets DDP skip the search)")

    @model_validator(mode="after")
    def _stage_goes_with_zero(self) -> StrategySpec:
        if self.name == "zero" and self.stage == 0:
            raise ValueError("stage: ZeRO stage 0 is plain data parallel; with name zero use 1, 2 or 3")
        if (self.name in ("zero", "deepspeed")) != (self.stage is not None):
            raise ValueError("stage: required with name zero (1, 2 or 3) or deepspeed (0-3), and only with them")
        if self.name != "deepspeed" and (self.offload_optimizer != "none" or self.config is not None):
            raise ValueError("offload_optimizer and config apply to name deepspeed only")
        if self.offload != "none" and not (self.name == "zero" and self.stage == 3):
            raise ValueError("offload applies to name zero stage 3 only (FSDP2 offloads parameters, gradients and"
                             " optimizer state); with name deepspeed use offload_optimizer")
        if (self.find_unused_parameters or self.static_graph) and not (
                self.name in ("ddp", "auto") or (self.name == "zero" and self.stage == 1)):
            raise ValueError("find_unused_parameters and static_graph apply to name ddp (or auto)"
                             " and zero stage 1 only")
        return self


class ParallelSpec(Section):
    """The device mesh: data x tensor x pipeline degrees, and how the pipeline is scheduled."""

    data: int = Field(default=-1, description="data-parallel degree; -1 = the rest of the world")
    data_replicate: int | None = Field(
        default=None, gt=0, description="data-parallel ranks that replicate each other (data = data_replicate x"
                                        " data_shard); null = data / data_shard")
    data_shard: int | None = Field(
        default=None, gt=0, description="data-parallel ranks that shard the parameters (strategy zero 2/3; with"
                                        " data_replicate > 1: HSDP); null = all of data for zero 2/3, else 1")
    tensor: int = Field(default=1, gt=0, description="tensor-parallel degree (DTensor, within each stage)")
    pipeline: int = Field(default=1, gt=0, description="pipeline-parallel degree (ranks per pipeline)")
    schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = Field(
        default="1f1b", description="pipeline schedule (torch.distributed.pipelining)")
    microbatches: int | None = Field(
        default=None, gt=0, description="pipeline micro-batches per micro-batch; null = the pipeline degree")
    stages_per_rank: int = Field(default=1, gt=0, description="pipeline stages per rank (>1 needs interleaved_1f1b)")
    split_points: list[str] = Field(
        default_factory=list,
        description='module paths where a new stage begins, e.g. ["blocks.2"]; empty = even split of model.blocks')
    tp_plan: dict[str, Literal["colwise", "rowwise"]] | None = Field(
        default=None,
        description="module path (fnmatch, e.g. blocks.*.fc1) -> colwise|rowwise; null = the model's tp_plan")

    @field_validator("data")
    @classmethod
    def _data_degree(cls, data: int) -> int:
        if data == 0 or data < -1:
            raise ValueError("must be -1 (the rest of the world) or a positive integer")
        return data

    @model_validator(mode="after")
    def _interleaving_needs_its_schedule(self) -> ParallelSpec:
        if self.stages_per_rank > 1 and self.schedule != "interleaved_1f1b":
            raise ValueError(f"stages_per_rank={self.stages_per_rank} needs schedule: interleaved_1f1b")
        return self


class ResourcesSpec(Section):
    nodes: int = Field(default=1, gt=0, description="at most 1024 unless the environment sets MESHYARD_MAX_NODES")
    procs_per_node: int = Field(default=1, gt=0, description="at most 256 unless the environment sets"
                                                            " MESHYARD_MAX_PROCS_PER_NODE")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto",
                                                   description="auto = cuda+nccl if present, else cpu+gloo")
    max_restarts: int = Field(default=0, ge=0, description="elastic restarts of the whole worker group")
    memory_per_rank: ByteSize | None = Field(
        default=None, description="strategy auto: the memory each rank's training may use, bytes or a size such as"
                                  " 4GiB or 512MiB (GB = 10**9); null = the GPU's memory, or on CPU host RAM /"
                                  " processes per node, x 0.8 (docs/planning.md)")

    @field_validator("memory_per_rank", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        if value is None:
            return None
        try:
            size = None if isinstance(value, bool) else _BYTE_SIZE.validate_python(value)
        except ValidationError:
            size = None
        if not size:
            raise ValueError(f"expected a positive number of bytes or a size such as 4GiB or 512MiB (got {value!r})")
        return size


class CheckpointSpec(Section):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    resume: str = Field(
        default="auto",
        description="auto = newest complete checkpoint of this run, never = refuse an existing one,"
                    " or a checkpoint path",
    )
    keep: int = Field(default=3, gt=0, description="complete checkpoints kept; older ones pruned")
    final: bool = Field(
        default=True, description="write a checkpoint at max_steps (export, quantize and teachers read the newest);"
                                  " stop_at_step and preemption always write one"
    )
    async_save: bool = Field(
        default=False, alias="async",
        description="write shards in the background (DCP async_save) while training goes on"
    )


class OutputSpec(Section):
    dir: str = Field(default="runs", min_length=1, description="the run directory is <dir>/<name>")


class PruneScheduleSpec(Section):
    start_step: int = Field(default=0, ge=0, description="first pruning event (after this optimizer step)")
    end_step: int = Field(gt=0, description="target sparsity is reached at this step")
    every: int = Field(default=10, gt=0, description="steps between pruning events")
    ramp: Literal["cubic", "linear"] = Field(default="cubic", description="sparsity ramp from start to end")

    @model_validator(mode="after")
    def _ordered(self) -> PruneScheduleSpec:
        if self.end_step < self.start_step:
            raise ValueError("end_step must not be before start_step")
        return self


class PruneSpec(Section):
    """Gradual pruning of every nn.Linear weight, masks computed by torch.nn.utils.prune."""

    method: Literal["magnitude", "l1_structured"] = "magnitude"
    scope: Literal["global", "per_layer"] = "global"
    amount: float = Field(ge=0, le=1, description="target sparsity (fraction of pruned weights)")
    schedule: PruneScheduleSpec

    @model_validator(mode="after")
    def _structured_is_per_layer(self) -> PruneSpec:
        if self.method == "l1_structured" and self.scope == "global":
            raise ValueError("method l1_structured prunes whole rows per layer; use scope: per_layer")
        return self


class TeacherSpec(Section):
    target: str | None = Field(default=None, pattern=IMPORT_PATH, description="teacher architecture")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = Field(
        default=None, description="a meshyard run directory (or checkpoint directory) holding the teacher's weights"
    )

    @model_validator(mode="after")
    def _one_source(self) -> TeacherSpec:
        if self.target is None and self.checkpoint is None:
            raise ValueError("give target (+ kwargs), checkpoint, or both")
        return self


class DistillSpec(Section):
    """loss = alpha * KL(student/T || teacher/T) * T^2 + (1 - alpha) * task loss."""

    teacher: TeacherSpec
    temperature: float = Field(default=2.0, gt=0)
    alpha: float = Field(default=0.5, ge=0, le=1)


class CompressionSpec(Section):
    prune: PruneSpec | None = None
    distill: DistillSpec | None = None


class ProfileSpec(Section):
    """torch.profiler over a few optimizer steps: one Chrome trace per listed rank."""

    steps: tuple[int, int] = Field(description="[first, last] optimizer step profiled, inclusive (steps count from 1)")
    ranks: list[int] = Field(default_factory=lambda: [0], min_length=1, description="global ranks that profile")

    @model_validator(mode="after")
    def _ordered(self) -> ProfileSpec:
        first, last = self.steps
        if first < 1 or last < first:
            raise ValueError(f"steps: [{first}, {last}] must be [a, b] with 1 <= a <= b")
        if any(rank < 0 for rank in self.ranks):
            raise ValueError(f"ranks: {self.ranks} must be non-negative global ranks")
        return self


class ObserveSpec(Section):
    """Where the run is watched besides metrics.jsonl (always written), what is profiled, and when a
    rank is called a straggler."""

    trackers: list[Literal["jsonl", "tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="experiment trackers fed from rank 0's records besides metrics.jsonl"
                                          " (jsonl: always on); each an optional extra: pip install 'meshyard[NAME]'")
    mlflow_tracking_uri: str | None = Field(
        default=None, min_length=1,
        description="MLflow's tracking URI; null = sqlite:///<run>/mlflow.db with artifacts in <run>/mlruns")
    mlflow_experiment: str = Field(default="meshyard", min_length=1, description="MLflow experiment name")
    profile: ProfileSpec | None = Field(
        default=None, description="torch.profiler Chrome traces to <run>/profile/rank<N>.json; null = off")
    straggler_threshold: float = Field(
        default=0.2, gt=0,
        description="name a rank a straggler when its own time per step (data wait + compute) exceeds the other"
                    " ranks' median by this fraction in 3 consecutive logged intervals")

    @field_validator("trackers")
    @classmethod
    def _once_each(cls, trackers: list[str]) -> list[str]:
        if len(set(trackers)) != len(trackers):
            raise ValueError(f"{trackers}: name each tracker once")
        return trackers


class JobSpec(Section):
    """A whole training job: WHAT to train. Where it runs comes from resources / the executor."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100,
                      description="run name; also the run directory name (at most 100 characters)")
    seed: int = Field(default=0, ge=0, lt=MAX_SEED, description="0 <= seed < 2**32")
    model: ModelSpec
    data: DataSpec
    loss: str = Field(
        default="mse", pattern=r"^(mse|cross_entropy|token_cross_entropy|model|[A-Za-z_][\w.]*:[A-Za-z_][\w.]*)$",
        description='mse, cross_entropy, token_cross_entropy (LM logits [B, T, V] vs ids [B, T]), model (the loss the'
                    ' model returns: output.loss or output["loss"]), or "module:callable" taking (output, target)',
    )
    optimizer: OptimizerSpec
    schedule: ScheduleSpec = ScheduleSpec()
    training: TrainingSpec
    strategy: StrategySpec = StrategySpec()
    parallel: ParallelSpec = ParallelSpec()
    resources: ResourcesSpec = ResourcesSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    output: OutputSpec = OutputSpec()
    compression: CompressionSpec = CompressionSpec()
    observe: ObserveSpec = ObserveSpec()
