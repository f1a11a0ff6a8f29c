"""Parallelism strategies, looked up by the plan's resolved strategy name."""
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

        return SingleProcessStrategy(device, precision, feed)
    if name in ("ddp", "zero") and stage in (None, 1):
        from strategies.ddp import DDPStrategy
        from strategies.zero1 import ZeroOneStrategy

        return (DDPStrategy if name == "ddp" else ZeroOneStrategy)(device, precision, feed, find_unused_parameters,
                                                                 static_graph)
    if name == "zero":
        from strategies.fsdp import FSDPStrategy

        return FSDPStrategy(device, precision, stage or 3, feed, layers_path)
    if name == "mesh" and layout is not None:
        from strategies.mesh import MeshStrategy

        return MeshStrategy(device, precision, layout, feed)
    if name == "deepspeed" and deepspeed_config is not None:
        from strategies.deepspeed_engine import DeepSpeedStrategy

        return DeepSpeedStrategy(device, precision, deepspeed_config, feed)
    raise ValueError(f"unknown strategy {name!r}")  # the plan only resolves implemented names


__all__ = ["BatchFeed", "Strategy", "build_strategy"]
