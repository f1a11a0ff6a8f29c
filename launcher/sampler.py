"""The data order contract.

Optimizer step `s` consumes one global batch of G = micro x accum x dp items. With shuffle off these
are exactly dataset items [s*G, (s+1)*G) (wrapping to the next epoch when the dataset runs out);
with shuffle on, the same positions of a permutation that depends only on (seed, epoch). The items
are dealt to ranks and micro-steps by position, so the SET consumed per step does not depend on the
dp size or the accumulation, which is what makes N-rank runs comparable to 1-process runs.

The position is a pure function of the step, so resuming at step s needs nothing but s.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler


@dataclass(frozen=True)
class BatchLayout:
    dataset_size: int
    micro_batch_size: int
    grad_accum_steps: int
    dp_rank: int
    dp_size: int
    seed: int
    shuffle: bool

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.dp_size

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_size // self.global_batch_size

    def epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.dataset_size))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.dataset_size, generator=gen).tolist()

    def micro_batches(self, step: int, order: list[int]) -> list[list[int]]:
        """This rank's micro-batches (index lists) for optimizer step `step` (0-based)."""
        start = (step % self.steps_per_epoch) * self.global_batch_size
        per_micro_step = self.micro_batch_size * self.dp_size
        batches = []
        for micro_step in range(self.grad_accum_steps):
            offset = start + micro_step * per_micro_step + self.dp_rank * self.micro_batch_size
            batches.append(order[offset : offset + self.micro_batch_size])
        return batches


class StepBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batch index lists for steps [start_step, end_step), in order."""

    def __init__(self, layout: BatchLayout, start_step: int, end_step: int) -> None:
        if layout.steps_per_epoch == 0:
            raise ValueError(
                f"the dataset has {layout.dataset_size} items, fewer than one global batch of "
                f"{layout.global_batch_size}; lower data.micro_batch_size or training.grad_accum_steps"
            )
        self.layout, self.start_step, self.end_step = layout, start_step, end_step

    def __iter__(self) -> Iterator[list[int]]:
        epoch, order = -1, []
        for step in range(self.start_step, self.end_step):
            step_epoch = step // self.layout.steps_per_epoch
            if step_epoch != epoch:
                epoch, order = step_epoch, self.layout.epoch_order(step_epoch)
            yield from self.layout.micro_batches(step, order)

    def __len__(self) -> int:
        return (self.end_step - self.start_step) * self.layout.grad_accum_steps
