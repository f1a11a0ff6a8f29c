"""Data parallel: DistributedDataParallel, gradients all-reduced once per accumulation window."""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from strategies.single import SingleProcessStrategy


def apply_ddp(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """Wrap `model` for data parallelism over the default process group."""
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


class DDPStrategy(SingleProcessStrategy):
    """Every rank holds the whole model; ranks see disjoint slices of each global batch."""

    def __init__(self, device: torch.device, precision: str) -> None:
        super().__init__(device, precision)
        self.dp_rank, self.dp_size = dist.get_rank(), dist.get_world_size()
        self.is_logging_rank = self.dp_rank == 0

    def _wrap(self, model: nn.Module) -> nn.Module:
        return apply_ddp(model, self.device)

    def _skip_grad_sync(self) -> contextlib.AbstractContextManager[Any]:
        # Gradients of non-final micro-batches stay local; the last backward all-reduces the sum.
        return self.model.no_sync()

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return self.reduce_sum(value) / self.dp_size

    def reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone()
        dist.all_reduce(value)
        return value
