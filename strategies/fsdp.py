"""ZeRO stages 2 and 3 with torch's FSDP2 (`fully_shard`) over a 1-D data-parallel mesh.

Stage 3 reshards parameters after forward (parameters, gradients and optimizer state sharded);
stage 2 keeps them unsharded from forward to the end of backward (gradients and optimizer state
sharded; parameters are sharded only at rest). Each repeated layer is wrapped, then the root.

The starting weights are the recipe's (strategies/model_init.py): by default the whole model is
built by its constructor on every rank and fully_shard keeps this rank's chunk of each parameter.
With `model.init: meta` it is built on the meta device and materialized one module at a time,
keeping only this rank's chunk, so no rank holds more than one module's full weights.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from strategies.base import LossFn, OptimizerFactory
from strategies.batch import BatchFeed
from strategies.data_parallel import DataParallelStrategy
from strategies.grads import ReduceFn
from strategies.layers import find_layers
from strategies.model_init import ModelRecipe

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor


def apply_fsdp(model: nn.Module, mesh: Any, reshard_after_forward: bool, layers_path: str | None = None) -> nn.Module:
    """Shard each repeated layer of `model` (if it has a layer list), then the root, over `mesh`."""
    found = find_layers(model, layers_path)
    for layer in found[1] if found is not None else ():
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def dim0_chunk(tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """FSDP2's shard of `tensor` on `rank` (torch.chunk on dim 0; ranks past the last chunk get none)."""
    chunks = torch.chunk(tensor, world_size, dim=0)
    return chunks[rank].clone() if rank < len(chunks) else tensor.new_empty((0, *tensor.shape[1:]))


def local_initial_state(recipe: ModelRecipe, model: nn.Module, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """This rank's dim-0 chunk of every parameter (and every buffer, whole) of a meta-built model,
    materialized one module at a time."""
    state: dict[str, torch.Tensor] = {}
    for prefix, module in recipe.materialize(model, keep=lambda module: False):
        for name, param in module.named_parameters(recurse=False):
            state[f"{prefix}.{name}" if prefix else name] = dim0_chunk(param.detach(), rank, world_size)
        for name, buffer in module.named_buffers(recurse=False):
            state[f"{prefix}.{name}" if prefix else name] = buffer.detach().clone()
    return state


class FSDPStrategy(DataParallelStrategy):
    def __init__(self, device: torch.device, precision: str, stage: int, feed: BatchFeed = BatchFeed(),
                 layers_path: str | None = None) -> None:
        super().__init__(device, precision, feed)
        self.mesh = init_device_mesh(device.type, (self.dp_size,), mesh_dim_names=("dp",))
        self.stage, self.layers_path = stage, layers_path

    def setup(self, recipe: ModelRecipe, build_optimizer: OptimizerFactory, loss_fn: LossFn) -> None:
        reshard = self.stage == 3
        if recipe.init == "meta":
            model = recipe.skeleton()
            initial = local_initial_state(recipe, model, self.dp_rank, self.dp_size)
            apply_fsdp(model, self.mesh, reshard, self.layers_path)
            model.to_empty(device=self.device)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    cast("DTensor", param).to_local().copy_(initial[name])
                for name, buffer in model.named_buffers():
                    buffer.copy_(initial[name])
        else:
            model = apply_fsdp(recipe.full(), self.mesh, reshard, self.layers_path).to(self.device)
        self.module = self.model = model
        self.optimizer = build_optimizer(model.parameters())
        self.loss_fn = loss_fn

    @contextlib.contextmanager
    def _skip_grad_sync(self) -> Iterator[None]:
        # Gradients of non-final micro-batches accumulate unsharded; the last backward reduce-scatters.
        # self.module is an FSDPModule: fully_shard made it one (apply_fsdp)
        cast("FSDPModule", self.module).set_requires_gradient_sync(False)
        try:
            yield
        finally:
            cast("FSDPModule", self.module).set_requires_gradient_sync(True)

    def _reduce_fn(self) -> ReduceFn:
        return self.reduce_sum  # each rank holds a shard: local sums add up over the group
