"""The job's named DeviceMesh: axes pp x dp_replicate x dp_shard x tp (torchtitan's names and order).

Every axis exists, of size 1 when unused, so each transform asks for its axis by name and a
transform whose axis has size 1 is simply not applied. Ranks are laid out with pp outermost and
tp innermost, so a tensor-parallel group is adjacent ranks (on one node when it fits).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from strategies.layout import MeshLayout

AXES = ("pp", "dp_replicate", "dp_shard", "tp")
DATA_AXES = ("dp_replicate", "dp_shard")


class NamedMesh:
    def __init__(self, layout: MeshLayout, device_type: str) -> None:
        self.layout = layout
        self.degrees = dict(zip(AXES, (layout.pp_degree, layout.dp_replicate_degree, layout.dp_shard_degree,
                                       layout.tp_degree)))
        self.mesh = init_device_mesh(device_type, tuple(self.degrees.values()), mesh_dim_names=AXES)

    def __getitem__(self, axis: str) -> DeviceMesh:
        return self.mesh[axis]

    def rank(self, axis: str) -> int:
        return self.mesh.get_local_rank(axis)

    def group(self, axis: str) -> dist.ProcessGroup:
        return self.mesh.get_group(axis)

    @property
    def dp_rank(self) -> int:
        """This rank's index among all data-parallel ranks (which slice of the global batch it reads)."""
        return self.rank("dp_replicate") * self.degrees["dp_shard"] + self.rank("dp_shard")

    def fsdp_mesh(self) -> DeviceMesh:
        """The mesh fully_shard works over: 1-D dp_shard, or 2-D (dp_replicate, dp_shard) for HSDP,
        which with a dp_shard of 1 replicates (DDP for DTensor parameters)."""
        if self.degrees["dp_replicate"] == 1:
            return self.mesh["dp_shard"]
        return self.mesh[DATA_AXES]

    def sum_over(self, axes: tuple[str, ...], value: torch.Tensor) -> torch.Tensor:
        """`value` summed over the groups of `axes` (one all-reduce per axis of size > 1), on every rank."""
        value = value.detach().clone()
        for axis in axes:
            if self.degrees[axis] > 1:
                dist.all_reduce(value, group=self.group(axis))
        return value
