"""Parallelism strategies, looked up by the plan's resolved strategy name."""
from __future__ import annotations

from typing import Any

import torch

from strategies.base import Strategy
from strategies.layout import MeshLayout


def build_strategy(name: str, device: torch.device, precision: str, stage: int | None = None,
                   deepspeed_config: dict[str, Any] | None = None, layout: MeshLayout | None = None) -> Strategy:
    if name == "single":
        from strategies.single import SingleProcessStrategy

        return SingleProcessStrategy(device, precision)
    if name == "ddp":
        from strategies.ddp import DDPStrategy

        return DDPStrategy(device, precision)
    if name == "zero" and stage == 1:
        from strategies.zero1 import ZeroOneStrategy

        return ZeroOneStrategy(device, precision)
    if name == "zero":
        from strategies.fsdp import FSDPStrategy

        return FSDPStrategy(device, precision, stage or 3)
    if name == "mesh" and layout is not None:
        from strategies.mesh import MeshStrategy

        return MeshStrategy(device, precision, layout)
    if name == "deepspeed" and deepspeed_config is not None:
        from strategies.deepspeed_engine import DeepSpeedStrategy

        return DeepSpeedStrategy(device, precision, deepspeed_config)
    raise ValueError(f"unknown strategy {name!r}")  # the plan only resolves implemented names


__all__ = ["Strategy", "build_strategy"]
