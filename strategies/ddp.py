"""Data parallel: DistributedDataParallel, gradients all-reduced once per accumulation window."""
from __future__ import annotations

import contextlib
from typing import Any, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from strategies.batch import BatchFeed
from strategies.data_parallel import DataParallelStrategy


def apply_ddp(model: nn.Module, device: torch.device, find_unused_parameters: bool = False,
              static_graph: bool = False) -> DistributedDataParallel:
    """Wrap `model` for data parallelism over the default process group."""
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters,
                                   static_graph=static_graph)


class DDPStrategy(DataParallelStrategy):
    """Every rank holds the whole model; ranks see disjoint slices of each global batch."""

    def __init__(self, device: torch.device, precision: str, feed: BatchFeed = BatchFeed(),
                 find_unused_parameters: bool = False, static_graph: bool = False) -> None:
        super().__init__(device, precision, feed)
        self.find_unused_parameters, self.static_graph = find_unused_parameters, static_graph

    def _wrap(self, model: nn.Module) -> nn.Module:
        return apply_ddp(model, self.device, self.find_unused_parameters, self.static_graph)

    def _skip_grad_sync(self) -> contextlib.AbstractContextManager[Any]:
        # Gradients of non-final micro-batches stay local; the last backward all-reduces the sum.
        return cast(DistributedDataParallel, self.model).no_sync()  # _wrap made it one
