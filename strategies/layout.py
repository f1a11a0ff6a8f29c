"""The device-mesh layout a job asks for, and where its pipeline stages cut the model.

Pure arithmetic, no process group: the plan uses it to refuse impossible layouts before any
process starts, and the composed strategy uses the same functions to build its mesh and split the model.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MeshLayout:
    """Degrees of the mesh axes (pp, dp_replicate, dp_shard, tp), the pipeline's settings, and where
    FSDP keeps its shards.

    `dp_degree` counts every data-parallel rank; `dp_shard_degree` of them shard the parameters
    (FSDP), and the dp_degree / dp_shard_degree groups of those replicate each other (DDP, or HSDP
    with both above 1).
    """

    dp_degree: int
    dp_shard_degree: int = 1
    tp_degree: int = 1
    pp_degree: int = 1
    schedule: str = "1f1b"
    microbatches: int = 1
    stages_per_rank: int = 1
    split_points: tuple[str, ...] = ()
    tp_plan: Mapping[str, str] | None = field(default=None, hash=False)
    layers: str | None = None  # module path of the repeated layers (model.layers); None = found by looking
    offload: bool = False  # ZeRO-3 shards, gradients and optimizer step in host memory (FSDP2 CPUOffloadPolicy, CUDA)

    @property
    def dp_replicate_degree(self) -> int:
        return self.dp_degree // self.dp_shard_degree

    @property
    def num_stages(self) -> int:
        return self.pp_degree * self.stages_per_rank

    def stage_indices(self, pp_rank: int) -> list[int]:
        """Loop placement (what torch's interleaved schedules expect): rank r holds r, r+p, r+2p, ..."""
        return [pp_rank + k * self.pp_degree for k in range(self.stages_per_rank)]


def stage_block_ranges(num_blocks: int, num_stages: int, split_points: tuple[str, ...] = (),
                       layers_path: str = "blocks") -> list[range]:
    """The layer indices of each stage; ValueError (naming the setting) when impossible.

    With no split points the blocks are split evenly, the first stages taking one extra block
    when the division is not exact.
    """
    if split_points:
        starts = []
        block_path = re.compile(rf"^{re.escape(layers_path)}\.(\d+)$")
        for path in split_points:
            match = block_path.match(path)
            if match is None:
                raise ValueError(f"parallel.split_points: {path!r} is not a layer path; expected {layers_path}.<index>")
            starts.append(int(match.group(1)))
        if starts != sorted(set(starts)) or starts[0] <= 0 or starts[-1] >= num_blocks:
            raise ValueError(f"parallel.split_points: {list(split_points)} must be increasing block paths between"
                             f" {layers_path}.1 and {layers_path}.{num_blocks - 1} (the model has {num_blocks} layers)")
        if len(starts) + 1 != num_stages:
            raise ValueError(f"parallel.split_points: {len(starts)} split points make {len(starts) + 1} stages, but"
                             f" pipeline x stages_per_rank = {num_stages}; give {num_stages - 1} split points")
        bounds = [0, *starts, num_blocks]
        return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    if num_stages > num_blocks:
        raise ValueError(f"parallel: pipeline x stages_per_rank = {num_stages} stages, but the model has only"
                         f" {num_blocks} layers ({layers_path}); lower parallel.pipeline or parallel.stages_per_rank")
    size, extra = divmod(num_blocks, num_stages)
    ranges, start = [], 0
    for stage in range(num_stages):
        end = start + size + (1 if stage < extra else 0)
        ranges.append(range(start, end))
        start = end
    return ranges
