"""What every multi-rank strategy shares: its place in the data-parallel group and reductions over it."""
from __future__ import annotations

import torch
import torch.distributed as dist

from strategies.batch import BatchFeed
from strategies.single import SingleProcessStrategy


class DataParallelStrategy(SingleProcessStrategy):
    """Base for strategies over the default process group (all ranks form one data-parallel group)."""

    def __init__(self, device: torch.device, precision: str, feed: BatchFeed = BatchFeed()) -> None:
        super().__init__(device, precision, feed)
        self.dp_rank, self.dp_size = dist.get_rank(), dist.get_world_size()
        self.is_logging_rank = self.dp_rank == 0

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return self.reduce_sum(value) / self.dp_size

    def reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone()
        dist.all_reduce(value)
        return value
