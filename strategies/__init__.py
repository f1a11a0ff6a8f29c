"""Parallelism strategies, looked up by the plan's resolved strategy name.

`single` is the 1-process reference, `deepspeed` adapts DeepSpeed's engine, and `ddp`/`zero` are
one composed strategy (strategies/composed.py) over the mesh the plan laid out.
"""
from __future__ import annotations

from typing import Any

import torch

from strategies.base import Strategy
from strategies.batch import BatchFeed
from strategies.layout import MeshLayout


def build_strategy(name: str, device: torch.device, precision: str, stage: int | None = None,
                   deepspeed_config: dict[str, Any] | None = None, layout: MeshLayout | None = None,
                   feed: BatchFeed = BatchFeed(), layers_path: str | None = None,
                   find_unused_parameters: bool = False, static_graph: bool = False) -> Strategy:
    if name == "single":
        from strategies.single import SingleProcessStrategy

        return SingleProcessStrategy(device, precision, feed, layers_path)
    if name in ("ddp", "zero"):
        import torch.distributed as dist

        from strategies.composed import ComposedStrategy
        from strategies.ddp import DDPOptions

        if layout is None:
            layout = data_parallel_layout(dist.get_world_size(), stage, layers_path)
        ddp_options = DDPOptions(find_unused_parameters, static_graph)
        return ComposedStrategy(device, precision, layout, stage, feed, ddp_options)
    if name == "deepspeed" and deepspeed_config is not None:
        from strategies.deepspeed_engine import DeepSpeedStrategy

        return DeepSpeedStrategy(device, precision, deepspeed_config, feed)
    raise ValueError(f"unknown strategy {name!r}")  # the plan only resolves implemented names


def data_parallel_layout(world_size: int, stage: int | None, layers_path: str | None) -> MeshLayout:
    """The plan's 1-D data parallel over the whole world (a plan without a mesh layout): sharded by
    ZeRO-2/3, else replicated."""
    return MeshLayout(dp_degree=world_size, dp_shard_degree=world_size if stage in (2, 3) else 1, layers=layers_path)


__all__ = ["BatchFeed", "Strategy", "build_strategy", "data_parallel_layout"]
