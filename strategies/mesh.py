"""Pipeline, tensor and data parallel composed on one named DeviceMesh (pp x dp x tp).

Pipeline parallel is the outer wrapper (torchtitan's order): the model is cut into stages, tensor
parallel is applied to the stages this rank holds, and data parallel averages gradients over the
`dp` axis once per accumulation window. The trainer still sees one `forward_backward(window)`:
without a pipeline it is the plain loop; with one, each micro-batch of the window is one
`schedule.step`, split into `microbatches` pipeline micro-batches.

Data parallel is an explicit all-reduce of the (local) gradients rather than DDP, because DDP does
not take DTensor parameters and a pipeline schedule runs backward itself; with one all-reduce per
window it moves the same bytes as DDP with no_sync.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import _init_optim_state, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh

from strategies.base import Batch, LossFn, OptimizerFactory
from strategies.batch import BatchFeed, to_device, tree_map
from strategies.grads import ReduceFn, local
from strategies.layers import find_layers
from strategies.layout import MeshLayout
from strategies.model_init import ModelRecipe
from strategies.pipeline import build_schedule, pipeline_model_loss, pipeline_split
from strategies.single import SingleProcessStrategy
from strategies.tensor_parallel import apply_tp, resolve_tp_plan

AXES = ("pp", "dp", "tp")


class MeshStrategy(SingleProcessStrategy):
    def __init__(self, device: torch.device, precision: str, layout: MeshLayout, feed: BatchFeed = BatchFeed()) -> None:
        super().__init__(device, precision, feed)
        self.layout = layout
        self.mesh = init_device_mesh(device.type, (layout.pp_degree, layout.dp_degree, layout.tp_degree),
                                     mesh_dim_names=AXES)
        self.groups = {axis: self.mesh.get_group(axis) for axis in AXES}
        self.pp_rank, self.dp_rank = self.mesh.get_local_rank("pp"), self.mesh.get_local_rank("dp")
        self.dp_size = layout.dp_degree
        self.is_logging_rank = dist.get_rank() == 0
        local_stages = layout.stage_indices(self.pp_rank)
        self.has_first_stage = 0 in local_stages
        self.has_last_stage = layout.num_stages - 1 in local_stages
        self._loss_scale = 1.0
        # loss: model under pipeline parallel (see setup)
        self._model_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    # -- setup -----------------------------------------------------------------------------------
    def setup(self, recipe: ModelRecipe, build_optimizer: OptimizerFactory, loss_fn: LossFn) -> None:
        # The whole model with its constructor's weights (or, with model.init meta, its skeleton).
        model = recipe.skeleton() if recipe.init == "meta" else recipe.full()
        self._all_param_names = [name for name, _ in model.named_parameters()]
        if self.layout.pp_degree > 1:
            layers = find_layers(model, self.layout.layers)
            owner, stages = pipeline_split(model, self.layout, self.pp_rank, layers[0] if layers else "blocks")
            if self.feed.loss_from_model:
                # The last stage returns logits: the model's loss is recomputed from them and the labels,
                # which reach it as the schedule's target (and no longer go to the first stage).
                self._model_loss = pipeline_model_loss(model)
                self.feed = dataclasses.replace(self.feed, loss_from_model=False)
        else:
            owner, stages = model, [model]
        if recipe.init == "meta":
            # Walk the whole model so the random draws match one process; keep only this rank's stages.
            mine = {id(module) for module in owner.modules()}
            for _ in recipe.materialize(model, keep=lambda module: id(module) in mine):
                pass
        if self.layout.tp_degree > 1:
            apply_tp(owner, self.mesh["tp"], resolve_tp_plan(model, self.layout.tp_plan))
        self.module = self.model = owner.to(self.device)
        self.stages = stages
        self.optimizer = build_optimizer(owner.parameters())
        self.loss_fn = self._model_loss or loss_fn
        if self.layout.pp_degree > 1:
            self.schedule = build_schedule(self.layout, stages, self.pp_rank, self.device, self.groups["pp"],
                                           self._scaled_loss, self.layout.microbatches)

    @property
    def model_parts(self) -> list[nn.Module]:
        return self.stages

    # -- training --------------------------------------------------------------------------------
    def forward_backward(self, micro_batches: Sequence[Batch], *, sync_grads: bool = True) -> torch.Tensor:
        if self.layout.pp_degree > 1:
            loss = self._pipeline_window(micro_batches)
        else:
            loss = super().forward_backward(micro_batches)
        if sync_grads and self.dp_size > 1:
            self._average_grads_over_dp()
        return loss

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
        dist.all_reduce(total, group=self.groups["pp"])  # zero everywhere but on the last stage
        return total

    def _average_grads_over_dp(self) -> None:
        grads = [local(p.grad) for p in self.module.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.groups["dp"])
        flat /= self.dp_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def _reduce_fn(self) -> ReduceFn:
        def reduce(parts: torch.Tensor) -> torch.Tensor:
            # [sum over tensor-parallel shards, sum over whole tensors]: shards add up over tp; every
            # stage holds different parameters, so the stage totals add up over pp; dp replicas agree.
            sharded = parts[:1].clone()
            if self.layout.tp_degree > 1:
                dist.all_reduce(sharded, group=self.groups["tp"])
            total = sharded + parts[1:]
            if self.layout.pp_degree > 1:
                dist.all_reduce(total, group=self.groups["pp"])
            return total

        return reduce

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
            schedule = build_schedule(self.layout, self.stages, self.pp_rank, self.device, self.groups["pp"],
                                      None, 1, schedule=forward_only)
            output = schedule.eval(*(args if self.has_first_stage else ()), **(kwargs if self.has_first_stage else {}))
        finally:
            self.module.train()
        box: list[Any] = [tree_map(lambda tensor: tensor.float().cpu(), output) if self.has_last_stage else None]
        dist.broadcast_object_list(box, group=self.groups["pp"], group_src=self.layout.pp_degree - 1)
        if self._model_loss is not None:  # what the model would return: its logits and its loss
            return {"logits": box[0], "loss": self._model_loss(box[0], target.cpu())}
        return box[0]

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return self.reduce_sum(value) / self.dp_size

    def reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone()
        if self.dp_size > 1:
            dist.all_reduce(value, group=self.groups["dp"])
        return value

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The layout of torch's get_state_dict (so `single`/`ddp` resume from it and vice versa),
        holding only this rank's parameters; TP parameters and their moments are DTensors, which
        DCP reshards on load. param_groups name the whole model's parameters on every rank."""
        _init_optim_state(self.optimizer)  # a fresh optimizer offers tensors to load into
        names = {id(p): name for name, p in self.module.named_parameters()}
        state = {names[id(p)]: dict(s) for p, s in self.optimizer.state.items()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": self._all_param_names}
                  for g in self.optimizer.param_groups]
        return {"model": get_model_state_dict(self.module), "optim": {"state": state, "param_groups": groups}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.module, state["model"])
        params = dict(self.module.named_parameters())
        for name, param_state in state["optim"]["state"].items():
            self.optimizer.state[params[name]] = param_state
