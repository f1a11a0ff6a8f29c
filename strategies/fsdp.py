"""ZeRO stages 2 and 3 with torch's FSDP2 (`fully_shard`) over a 1-D data-parallel mesh.

Stage 3 reshards parameters after forward (parameters, gradients and optimizer state sharded);
stage 2 keeps them unsharded from forward to the end of backward (gradients and optimizer state
sharded; parameters are sharded only at rest). Each repeated block is wrapped, then the root.

The model is built on the meta device and materialized shard by shard: every module's own
parameters are created full-size on the CPU one module at a time, initialized by its
`reset_parameters()` in registration order under the job's seed (which reproduces what the
model's constructor would have done, so sharded runs start from the single-process weights),
and only this rank's chunk is kept. No rank ever holds more than one module's full weights.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from strategies.base import LossFn, ModelFactory, OptimizerFactory
from strategies.data_parallel import DataParallelStrategy
from strategies.meta_init import init_module_by_module


def apply_fsdp(model: nn.Module, mesh: Any, reshard_after_forward: bool) -> nn.Module:
    """Shard each block of `model.blocks` (if any), then the root, over `mesh`."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        for block in blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def dim0_chunk(tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """FSDP2's shard of `tensor` on `rank` (torch.chunk on dim 0; ranks past the last chunk get none)."""
    chunks = torch.chunk(tensor, world_size, dim=0)
    return chunks[rank].clone() if rank < len(chunks) else tensor.new_empty((0, *tensor.shape[1:]))


def local_initial_state(model: nn.Module, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """This rank's dim-0 chunk of every parameter (and every buffer, whole), initialized one module
    at a time (see strategies/meta_init.py)."""
    state: dict[str, torch.Tensor] = {}
    for prefix, module in init_module_by_module(model):
        for name, param in module.named_parameters(recurse=False):
            state[f"{prefix}.{name}" if prefix else name] = dim0_chunk(param.detach(), rank, world_size)
        for name, buffer in module.named_buffers(recurse=False):
            state[f"{prefix}.{name}" if prefix else name] = buffer.detach().clone()
    return state


class FSDPStrategy(DataParallelStrategy):
    def __init__(self, device: torch.device, precision: str, stage: int) -> None:
        super().__init__(device, precision)
        self.mesh = init_device_mesh(device.type, (self.dp_size,), mesh_dim_names=("dp",))
        self.stage = stage

    def setup(self, build_model: ModelFactory, build_optimizer: OptimizerFactory, loss_fn: LossFn) -> None:
        with torch.device("meta"):
            model = build_model()
        initial = local_initial_state(model, self.dp_rank, self.dp_size)
        apply_fsdp(model, self.mesh, reshard_after_forward=self.stage == 3)
        model.to_empty(device=self.device)
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.to_local().copy_(initial[name])
            for name, buffer in model.named_buffers():
                buffer.copy_(initial[name])
        self.module = self.model = model
        self.optimizer = build_optimizer(model.parameters())
        self.loss_fn = loss_fn

    @contextlib.contextmanager
    def _skip_grad_sync(self) -> Iterator[None]:
        # Gradients of non-final micro-batches accumulate unsharded; the last backward reduce-scatters.
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    def _reduce_fn(self):  # type: ignore[no-untyped-def]
        return self.reduce_sum  # each rank holds a shard: local sums add up over the group
