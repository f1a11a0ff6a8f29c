"""ZeRO stages 2 and 3 (and HSDP) with torch's FSDP2 `fully_shard` over the data-parallel mesh.

Stage 3 reshards parameters after forward (parameters, gradients and optimizer state sharded);
stage 2 keeps them unsharded from forward to the end of backward (gradients and optimizer state
sharded; parameters are sharded only at rest). Each repeated layer is one group (one all-gather,
one reduce-scatter), then the root takes the rest. Over a 2-D (dp_replicate, dp_shard) mesh it is
HSDP: sharded within dp_shard, replicated (gradients all-reduced) across dp_replicate. Parameters
that tensor parallel made DTensors become 2-D (dp_shard x tp) DTensors.

Precision and placement (docs/strategies.md, "Mixed precision and offload for sharded runs"):
`training.precision: bf16` is FSDP2's `MixedPrecisionPolicy`, not autocast: each group's
parameters are all-gathered in bf16 and forward/backward compute in bf16, gradients are
reduce-scattered in fp32 into the fp32 shards, which the optimizer steps (fp32 master weights and
state). The root's outputs come back in fp32, so the loss is computed in fp32 as under autocast.
`strategy.offload: cpu` (ZeRO-3 on CUDA) adds `CPUOffloadPolicy`: shards, their gradients and the
optimizer step live in host memory, each group is copied to the device for its all-gather.

`model.init: meta` without tensor parallel: the model is built on the meta device and
materialized one module at a time, keeping only this rank's dim-0 chunk of each parameter
(`local_initial_state`), so no rank holds more than one module's full weights.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import cast

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from strategies.model_init import ModelRecipe

FP32 = MixedPrecisionPolicy()  # no casts: parameters, compute and reduction in the parameters' dtype


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """FSDP2's policy for `training.precision`: bf16 parameters and compute with fp32 gradient
    reduction, or no casts."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return FP32


def apply_fsdp(module: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool,
               layers: Iterable[nn.Module] = (), mp_policy: MixedPrecisionPolicy = FP32,
               offload: bool = False, fp32_output: bool = True) -> nn.Module:
    """Shard each of `layers` (submodules of `module`), then `module` itself, over `mesh` (in place:
    the module becomes an FSDPModule). With a low-precision `mp_policy` and `fp32_output`, the
    root's floating-point outputs are cast to fp32 (the loss reads them; a pipeline stage that
    feeds another keeps them in bf16)."""
    offload_policy = CPUOffloadPolicy() if offload else OffloadPolicy()
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy,
                    offload_policy=offload_policy)
    if fp32_output and mp_policy.param_dtype is not None:
        mp_policy = dataclasses.replace(mp_policy, output_dtype=torch.float32)
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy,
                offload_policy=offload_policy)
    return module


def dim0_chunk(tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """FSDP2's shard of `tensor` on `rank` (torch.chunk on dim 0; ranks past the last chunk get none)."""
    chunks = torch.chunk(tensor, world_size, dim=0)
    return chunks[rank].clone() if rank < len(chunks) else tensor.new_empty((0, *tensor.shape[1:]))


def local_initial_state(recipe: ModelRecipe, model: nn.Module, names: set[str], rank: int,
                        world_size: int) -> dict[str, torch.Tensor]:
    """This rank's dim-0 chunk of every parameter named in `names` (and those buffers, whole) of a
    meta-built model, materialized one module at a time (the whole model is walked, so the random
    draws are the ones a single process makes)."""
    state: dict[str, torch.Tensor] = {}
    for prefix, module in recipe.materialize(model, keep=lambda module: False):
        for name, param in module.named_parameters(recurse=False):
            if (key := f"{prefix}.{name}" if prefix else name) in names:
                state[key] = dim0_chunk(param.detach(), rank, world_size)
        for name, buffer in module.named_buffers(recurse=False):
            if (key := f"{prefix}.{name}" if prefix else name) in names:
                state[key] = buffer.detach().clone()
    return state


@torch.no_grad()
def load_local_state(module: nn.Module, state: dict[str, torch.Tensor], device: torch.device,
                     offload: bool = False) -> None:
    """Give a sharded meta module storage on `device` (offloaded shards: in host memory, buffers
    still on `device`, where compute reads them) and fill it from `local_initial_state`."""
    module.to_empty(device="cpu" if offload else device)
    for name, param in module.named_parameters():
        cast(DTensor, param).to_local().copy_(state[name])  # fully_shard made every parameter a DTensor
    for name, buffer in module.named_buffers():
        buffer.copy_(state[name])
        if buffer.device != device:
            torch.utils.swap_tensors(buffer, buffer.to(device))  # in place: the module keeps its buffer object
