"""How many parameter elements one rank holds, for each way meshyard shards a model.

Counted on the meta-built model with the functions the strategies use themselves (the pipeline
split, the tensor-parallel plan, FSDP2's dim-0 chunks, ZeroRedundancyOptimizer's greedy
partition), so the counts are exact for rank 0 of each group, which holds the largest shard.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from strategies.layout import MeshLayout


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class PartCounts:
    """Parameter elements of one pipeline rank's part of the model (the whole model without a pipeline)."""

    stages: tuple[int, ...]
    sizes: tuple[int, ...]  # elements of each parameter tensor, after the pipeline split and tensor parallel
    fsdp_sizes: tuple[int, ...]  # its FSDP2 dim-0 chunk of each on data-parallel rank 0
    zero1_sizes: tuple[int, ...]  # the tensors of the largest ZeroRedundancyOptimizer partition
    layers: tuple[int, ...]  # elements of each repeated layer it holds (FSDP's units besides the root)
    units: tuple[tuple[int, ...], ...]  # FSDP2's units: the `sizes` of each layer held, then of the root (the rest)

    @property
    def local(self) -> int:
        return sum(self.sizes)

    @property
    def fsdp_shard(self) -> int:
        return sum(self.fsdp_sizes)

    @property
    def zero1_partition(self) -> int:
        return sum(self.zero1_sizes)


def pipeline_parts(model: nn.Module, layout: MeshLayout | None, layers_path: str | None
                   ) -> list[tuple[tuple[int, ...], nn.Module]]:
    """(stage indices, module holding their parameters) per pipeline rank."""
    if layout is None or layout.pp_degree == 1:
        return [((0,), model)]
    from strategies.pipeline import pipeline_split

    return [(tuple(layout.stage_indices(rank)), pipeline_split(model, layout, rank, layers_path or "blocks")[0])
            for rank in range(layout.pp_degree)]


def tp_numel(name: str, shape: tuple[int, ...], styles: dict[str, str], degree: int) -> int:
    """Elements of parameter `name` on tensor-parallel rank 0: column-wise layers split weight and
    bias on dim 0, row-wise layers the weight on dim 1 (their bias is replicated)."""
    module, _, kind = name.rpartition(".")
    style = styles.get(module)
    dim = 0 if style == "colwise" else 1 if style == "rowwise" and kind == "weight" else None
    if degree == 1 or dim is None or dim >= len(shape):
        return math.prod(shape)
    return math.prod(ceil_div(size, degree) if d == dim else size for d, size in enumerate(shape))


def fsdp_chunk(shape: tuple[int, ...], dp: int) -> int:
    """FSDP2 keeps torch.chunk(param, dp, dim=0)[rank]; rank 0's chunk is the largest."""
    if not shape:
        return 1
    return ceil_div(shape[0], dp) * math.prod(shape[1:])


def greedy_partition(sizes: list[int], dp: int) -> tuple[int, ...]:
    """ZeroRedundancyOptimizer's partition: largest tensor first, each to the least loaded rank; the
    tensors of the most loaded rank."""
    parts: list[list[int]] = [[] for _ in range(dp)]
    for size in sorted(sizes, reverse=True):
        min(parts, key=sum).append(size)
    return tuple(max(parts, key=sum))


def count_part(stages: tuple[int, ...], part: nn.Module, layers: nn.ModuleList | None, tp_styles: dict[str, str],
               tp: int, dp: int) -> PartCounts:
    params = dict(part.named_parameters())  # shared parameters once, as optimizers see them
    local = {name: tp_numel(name, tuple(p.shape), tp_styles, tp) for name, p in params.items()}
    held = {id(p) for p in params.values()}
    layer_sizes = tuple(sum(p.numel() for p in layer.parameters()) for layer in layers or ()
                        if any(id(p) in held for p in layer.parameters()))
    names = {id(p): name for name, p in params.items()}
    in_layers = [[names[id(p)] for p in layer.parameters() if id(p) in names] for layer in layers or ()]
    rest = set(params) - {name for unit in in_layers for name in unit}
    units = (*(tuple(local[name] for name in unit) for unit in in_layers if unit),
             tuple(local[name] for name in sorted(rest)))
    return PartCounts(
        stages=stages, sizes=tuple(local.values()),
        fsdp_sizes=tuple(fsdp_chunk(tuple(p.shape), dp) for p in params.values()),
        zero1_sizes=greedy_partition(list(local.values()), dp), layers=layer_sizes, units=units,
    )
