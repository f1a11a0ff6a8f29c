"""Data parallel by replication: DistributedDataParallel over the mesh's dp_replicate axis.

Used where data parallel is the mesh's only axis. With tensor or pipeline parallel, replication is
FSDP2 over a dp_shard axis of size 1 (strategies/composed.py says why).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DDPOptions:
    find_unused_parameters: bool = False  # some parameters get no gradient in some steps (slower backward)
    static_graph: bool = False  # the set of used parameters never changes


def apply_ddp(model: nn.Module, mesh: DeviceMesh, device: torch.device,
              options: DDPOptions = DDPOptions()) -> DistributedDataParallel:
    """Wrap `model` so its gradients are averaged over the 1-D `mesh` (all-reduce, bucketed)."""
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, device_mesh=mesh,
                                   find_unused_parameters=options.find_unused_parameters,
                                   static_graph=options.static_graph)
