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

        if layout is None:  # the plan's 1-D data parallel over the whole world
            world = dist.get_world_size()
            layout = MeshLayout(dp_degree=world, dp_shard_degree=world if stage in (2, 3) else 1, layers=layers_path)
        ddp_options = DDPOptions(find_unused_parameters, static_graph)
        return ComposedStrategy(device, precision, layout, stage, feed, ddp_options)
    if name == "deepspeed" and deepspeed_config is not None:
        from strategies.deepspeed_engine import DeepSpeedStrategy

        return DeepSpeedStrategy(device, precision, deepspeed_config, feed)
    raise ValueError(f"unknown strategy {name!r}")  # the plan only resolves implemented names


__all__ = ["BatchFeed", "Strategy", "build_strategy"]
