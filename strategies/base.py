"""The seam between the trainer loop and every parallelism.

The loop never calls `.backward()` and never branches on a strategy's name: it hands the strategy one
accumulation window of micro-batches and asks it to regularize, clip and step. That keeps pipeline
parallel (whose schedule runs forward and backward itself) and DeepSpeed (whose engine owns the
optimizer) on the same loop as DDP.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from strategies.batch import LossFn
from strategies.model_init import ModelRecipe

Batch = Any  # what the DataLoader collates: see strategies/batch.py for the contract
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class NativeCheckpoint(Protocol):
    """An engine's own checkpoint format, written into (and read from) one checkpoint directory."""

    format: str  # recorded in the checkpoint's manifest, so readers know how to consolidate it

    def save(self, path: Path) -> None: ...

    def load(self, path: Path) -> None: ...


class DCPStateful(Protocol):
    """What the default checkpoint (torch.distributed.checkpoint) needs from a strategy."""

    def state_dict(self) -> dict[str, Any]:
        """{'model': ..., 'optim': ...} in torch.distributed.checkpoint's layout."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of state_dict()."""


class Strategy(Protocol):
    dp_rank: int
    dp_size: int
    is_logging_rank: bool
    optimizer: torch.optim.Optimizer
    native_checkpoint: NativeCheckpoint | None  # None: the strategy is DCPStateful, checkpoints are DCP

    @property
    def model_parts(self) -> list[nn.Module]:
        """The unwrapped model: one part, or this rank's pipeline stages."""

    @property
    def local_optimizer_state(self) -> dict[Any, dict[str, Any]]:
        """The optimizer state this rank stores (for memory accounting)."""

    def setup(self, recipe: ModelRecipe, build_optimizer: OptimizerFactory, loss_fn: LossFn) -> None:
        """Build model and optimizer in ONE call: sharding strategies own both together. The model
        starts from exactly the weights the recipe gives (strategies/model_init.py)."""

    def forward_backward(self, micro_batches: Sequence[Batch], *, sync_grads: bool = True) -> torch.Tensor:
        """Accumulate gradients of the window's mean loss; return that loss (this rank's, detached).

        With sync_grads=False no gradient communication happens for the whole window.
        """

    def regularize(self, l1: float, l2: float) -> torch.Tensor:
        """Add l1*sign(w) + 2*l2*w to every gradient; return the penalty l1*|w|_1 + l2*|w|^2."""

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor | None:
        """Global gradient norm over all parameters (clipped to max_norm when given), pre-clip value.

        None when the strategy's engine clips inside its own step (DeepSpeed ZeRO >= 1); then
        optimizer_step() returns the norm.
        """

    def optimizer_step(self) -> torch.Tensor | None:
        """Step the optimizer and zero the gradients; return the pre-clip norm if the step measured it."""

    def discard_grads(self) -> None:
        """Drop this window's gradients without stepping (a skipped non-finite update)."""

    def evaluate(self, batch: Batch) -> Any:
        """What the model returns for one eval batch (eval mode, no gradients); metrics are the loop's job."""

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average a scalar over the data-parallel group (every rank gets the result)."""

    def reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over the data-parallel group (every rank gets the result)."""

    def close(self) -> None:
        """Release what the strategy's engine holds, while the process group still exists."""
