"""Optimizers and LR schedules from the spec.

L1/L2 are not here on purpose: they are gradient transforms applied by the strategy once per
optimizer step (see strategies/grads.py), so `weight_decay` below is only the optimizer's own.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from launcher.spec.schema import OptimizerSpec, ScheduleSpec


def _make(spec: OptimizerSpec, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    common: dict[str, Any] = {"lr": spec.lr, "weight_decay": spec.weight_decay}
    # foreach=False keeps the per-parameter kernels, so results do not depend on how many
    # parameters a rank holds (sharded strategies hold fewer): parity stays exact.
    if spec.name == "sgd":
        return torch.optim.SGD(params, momentum=spec.momentum, nesterov=spec.nesterov, foreach=False, **common)
    if spec.name == "adam":
        return torch.optim.Adam(params, betas=spec.betas, eps=spec.eps, foreach=False, **common)
    if spec.name == "adamw":
        return torch.optim.AdamW(params, betas=spec.betas, eps=spec.eps, foreach=False, **common)
    return torch.optim.RMSprop(params, alpha=spec.alpha, eps=spec.eps, momentum=spec.momentum, foreach=False, **common)


def optimizer_factory(spec: OptimizerSpec) -> Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]:
    """A one-argument factory (params -> optimizer), as Strategy.setup expects."""
    return partial(_make, spec)


class WarmupDecay:
    """LR multiplier at optimizer step `step`: linear warmup, then constant/linear/cosine decay."""

    def __init__(self, spec: ScheduleSpec, max_steps: int) -> None:
        self.spec, self.max_steps = spec, max_steps

    def __call__(self, step: int) -> float:
        warmup = self.spec.warmup_steps
        if step < warmup:
            return (step + 1) / warmup
        if self.spec.decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, self.max_steps - warmup))
        floor = self.spec.min_lr_ratio
        if self.spec.decay == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, spec: ScheduleSpec, max_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, WarmupDecay(spec, max_steps))
