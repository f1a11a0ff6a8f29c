"""Every torch-native parallelism composed on one named mesh (pp x dp_replicate x dp_shard x tp).

`parallelize` applies torchtitan's order to each model part (one part, or this rank's pipeline
stages): tensor parallel -> activation checkpointing -> compile (each on the part's repeated layers)
-> data parallel. Data parallel is:

- FSDP2 `fully_shard` when parameters are sharded over dp_shard (ZeRO-2/3; with dp_replicate too,
  HSDP), and for replication on any mesh with a model-parallel axis (FSDP2 over a dp_shard axis of
  size 1): DDP does not take tensor-parallel DTensors, and torch's pipelining drives DDP through
  its reducer's internals, which failed here once a window held several schedule steps ("rebuilt
  parameter indices size is not same as original model parameters size");
- DistributedDataParallel for plain data parallel (the mesh's only axis is dp_replicate), with
  ZeRO-1's ZeroRedundancyOptimizer on top for stage 1.

The trainer sees one `forward_backward(window)`: without a pipeline it is the plain loop; with one,
each micro-batch of the window is one `schedule.step`, split into `microbatches` pipeline
micro-batches, and the schedule drives DDP's/FSDP's gradient sync at each step's last backward.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from strategies.base import Batch, LossFn, OptimizerFactory
from strategies.batch import BatchFeed, to_device, tree_map
from strategies.ddp import DDPOptions, apply_ddp
from strategies.fsdp import apply_fsdp, load_local_state, local_initial_state, mixed_precision
from strategies.grads import StageSum
from strategies.layers import find_layers
from strategies.layout import MeshLayout
from strategies.mesh import DATA_AXES, NamedMesh
from strategies.model_init import ModelRecipe
from strategies.pipeline import TensorOutput, build_schedule, pipeline_model_loss, pipeline_split
from strategies.single import SingleProcessStrategy
from strategies.tensor_parallel import apply_tp, resolve_tp_plan
from strategies.zero1 import shard_optimizer


class ComposedStrategy(SingleProcessStrategy):
    def __init__(self, device: torch.device, precision: str, layout: MeshLayout, zero_stage: int | None = None,
                 feed: BatchFeed = BatchFeed(), ddp_options: DDPOptions | None = None) -> None:
        super().__init__(device, precision, feed, layout.layers)
        self.layout, self.zero_stage, self.ddp_options = layout, zero_stage, ddp_options or DDPOptions()
        self.mesh = NamedMesh(layout, device.type)
        self.pp_rank, self.dp_rank, self.dp_size = self.mesh.rank("pp"), self.mesh.dp_rank, layout.dp_degree
        self.is_logging_rank = dist.get_rank() == 0
        local_stages = layout.stage_indices(self.pp_rank)
        self.has_first_stage = 0 in local_stages
        self.has_last_stage = layout.num_stages - 1 in local_stages
        # data parallel by FSDP2, not DDP (see the module docstring)
        self.fsdp = layout.dp_shard_degree > 1 or layout.tp_degree > 1 or layout.pp_degree > 1
        # bf16 where FSDP2 wraps the model is its MixedPrecisionPolicy, not autocast (strategies/fsdp.py)
        self.mp_policy = mixed_precision(precision if self.fsdp and self.dp_size > 1 else "fp32")
        if self.mp_policy.param_dtype is not None:
            self.autocast_dtype = None
        self._loss_scale = 1.0
        # loss: model under pipeline parallel (see setup)
        self._model_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    # -- setup -----------------------------------------------------------------------------------
    def setup(self, recipe: ModelRecipe, build_optimizer: OptimizerFactory, loss_fn: LossFn) -> None:
        # The whole model with its constructor's weights (or, with model.init meta, its skeleton).
        model = recipe.skeleton() if recipe.init == "meta" else recipe.full()
        if recipe.wraps_layers:
            layers: tuple[str, nn.ModuleList] | None = self._model_layers(model)
        else:
            layers = find_layers(model, self.layout.layers) if self.fsdp else None
        layer_ids = {id(layer) for layer in layers[1]} if layers else set()
        self.recipe, self.model_layers = recipe, list(layers[1]) if layers else []
        if self.layout.pp_degree > 1:
            owner, stages = pipeline_split(model, self.layout, self.pp_rank, layers[0] if layers else "blocks")
            if self.feed.loss_from_model:
                # The last stage returns logits: the model's loss is recomputed from them and the labels,
                # which reach it as the schedule's target (and no longer go to the first stage).
                self._model_loss = pipeline_model_loss(model)
                self.feed = dataclasses.replace(self.feed, loss_from_model=False)
        else:
            owner, stages = model, [model]
        initial = self._materialize(recipe, model, owner)
        tp_plan = resolve_tp_plan(model, self.layout.tp_plan) if self.layout.tp_degree > 1 else {}
        last = self.layout.num_stages - 1
        self.parts = [
            self.parallelize(stage, [m for m in stage.modules() if id(m) in layer_ids], tp_plan,
                             is_last=self.layout.pp_degree > 1 and index == last)
            for stage, index in zip(stages, self.layout.stage_indices(self.pp_rank))
        ]
        # the whole model's layer list served the parts' wrapping (every_<k> counts over it); kept, it would
        # hold every other pipeline stage's layers alive on this rank (a stage of parameters, ~20 MiB in the
        # accuracy benchmark's 2-stage transformer)
        self.model_layers = []
        if initial is not None:
            load_local_state(owner, initial, self.device, self.layout.offload)
        self.module, self.stages, self.model = owner, stages, self.parts[0]
        if self.zero_stage == 1 and self.dp_size > 1:
            self.optimizer = shard_optimizer(owner.parameters(), build_optimizer, self.mesh.group("dp_replicate"))
        else:
            self.optimizer = build_optimizer(owner.parameters())  # after fully_shard: over its DTensors
        self.loss_fn = self._model_loss or loss_fn
        if self.layout.pp_degree > 1:
            self.schedule = build_schedule(self.layout, self.parts, self.pp_rank, self.device, self.mesh.group("pp"),
                                           self._scaled_loss, self.layout.microbatches)

    def _materialize(self, recipe: ModelRecipe, model: nn.Module, owner: nn.Module) -> dict[str, torch.Tensor] | None:
        """Give this rank's stages their starting weights on the device. With `model.init: meta` and
        FSDP alone, only this rank's chunk of each parameter is kept; the caller loads it once the
        meta module is sharded (returned). Otherwise the stages are materialized whole."""
        if recipe.init == "meta" and self.layout.dp_shard_degree > 1 and self.layout.tp_degree == 1:
            names = {name for name, _ in [*owner.named_parameters(), *owner.named_buffers()]}
            return local_initial_state(recipe, model, names, self.mesh.rank("dp_shard"), self.layout.dp_shard_degree)
        if recipe.init == "meta":
            # Walk the whole model so the random draws match one process; keep only this rank's stages.
            mine = {id(module) for module in owner.modules()}
            for _ in recipe.materialize(model, keep=lambda module: id(module) in mine):
                pass
        if not self.layout.offload:  # offloaded, fully_shard takes each group to the device to shard it
            owner.to(self.device)
        return None

    def parallelize(self, part: nn.Module, layers: list[nn.Module], tp_plan: dict[str, str],
                    is_last: bool) -> nn.Module:
        """One model part (the model, or one pipeline stage), in torchtitan's order."""
        if self.layout.tp_degree > 1:
            apply_tp(part, self.mesh["tp"], tp_plan)
        self._wrap_layers(self.recipe, self.model_layers, layers)  # activation checkpointing, then compile
        if is_last:
            part = TensorOutput(part)  # the module the schedule runs (and data parallel wraps) returns a tensor
        if self.dp_size == 1:
            return part
        if self.fsdp:
            return apply_fsdp(part, self.mesh.fsdp_mesh(), reshard_after_forward=self.zero_stage == 3, layers=layers,
                              mp_policy=self.mp_policy, offload=self.layout.offload,
                              fp32_output=self.layout.pp_degree == 1 or is_last)
        return apply_ddp(part, self.mesh["dp_replicate"], self.device, self.ddp_options)

    @property
    def model_parts(self) -> list[nn.Module]:
        return self.stages

    @property
    def _local_optimizer(self) -> torch.optim.Optimizer:
        if isinstance(self.optimizer, ZeroRedundancyOptimizer):
            return self.optimizer.optim  # ZeRO-1: the optimizer over this rank's partition
        return self.optimizer

    # -- training --------------------------------------------------------------------------------
    def forward_backward(self, micro_batches: Sequence[Batch], *, sync_grads: bool = True) -> torch.Tensor:
        if self.layout.pp_degree == 1:
            return super().forward_backward(micro_batches, sync_grads=sync_grads)
        if not sync_grads and self.dp_size > 1:
            raise ValueError("pipeline schedules synchronize data-parallel gradients at each step's last backward")
        return self._pipeline_window(micro_batches)

    @contextlib.contextmanager
    def _skip_grad_sync(self) -> Iterator[None]:
        # Gradients of non-final micro-batches stay local; the last backward reduces the window's sum.
        if isinstance(self.model, DistributedDataParallel):
            with self.model.no_sync():
                yield
        elif isinstance(self.model, FSDPModule):
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        else:
            yield

    def _scaled_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # The schedule backpropagates each pipeline micro-batch's loss as returned here.
        return self.feed.loss(output, target, self.loss_fn) * self._loss_scale

    def _pipeline_window(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        """Mean loss of the window, known on every pipeline rank (only the last stage computes it)."""
        self._loss_scale = 1.0 / (self.layout.microbatches * len(micro_batches))
        total = torch.zeros((), device=self.device)
        for batch in micro_batches:
            args, kwargs, target = self.feed.split(to_device(batch, self.device))
            losses: list[torch.Tensor] = []
            # Only the first stage takes the inputs (every tensor leaf is split into pipeline micro-batches).
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                enabled=self.autocast_dtype is not None):
                self.schedule.step(*(args if self.has_first_stage else ()),
                                   target=target if self.has_last_stage else None,
                                   losses=losses if self.has_last_stage else None, return_outputs=False,
                                   **(kwargs if self.has_first_stage else {}))
            total += sum((loss.detach().float() for loss in losses), torch.zeros((), device=self.device))
        return self.mesh.sum_over(("pp",), total)  # zero everywhere but on the last stage

    def _stage_sum(self) -> StageSum | None:
        # Every stage holds different parameters: stage totals add up over pp.
        return (lambda value: self.mesh.sum_over(("pp",), value)) if self.layout.pp_degree > 1 else None

    # -- evaluation and reductions ---------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batch: Batch) -> Any:
        if self.layout.pp_degree == 1:
            return super().evaluate(batch)
        args, kwargs, target = self.feed.split(to_device(batch, self.device))
        self.module.eval()
        try:
            # A one-micro-batch schedule of fresh stages: buffers are sized per call, so any eval batch fits.
            forward_only = "gpipe" if self.layout.stages_per_rank == 1 else "interleaved_1f1b"
            schedule = build_schedule(self.layout, self.parts, self.pp_rank, self.device, self.mesh.group("pp"),
                                      None, 1, schedule=forward_only)
            output = schedule.eval(*(args if self.has_first_stage else ()), **(kwargs if self.has_first_stage else {}))
        finally:
            self.module.train()
        box: list[Any] = [tree_map(lambda tensor: tensor.float().cpu(), output) if self.has_last_stage else None]
        dist.broadcast_object_list(box, group=self.mesh.group("pp"), group_src=self.layout.pp_degree - 1)
        if self._model_loss is not None:  # what the model would return: its logits and its loss
            return {"logits": box[0], "loss": self._model_loss(box[0], target.cpu())}
        return box[0]

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return self.reduce_sum(value) / self.dp_size

    def reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return self.mesh.sum_over(DATA_AXES, value)
