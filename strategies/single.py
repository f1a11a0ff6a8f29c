"""One process, no process group: the reference every other strategy is held to."""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from strategies.base import Batch, LossFn, NativeCheckpoint, OptimizerFactory
from strategies.batch import BatchFeed, to_device
from strategies.grads import ReduceFn, add_l1_l2_, clip_grad_norm_
from strategies.model_init import ModelRecipe


class SingleProcessStrategy:
    """Plain training. Subclasses change how the model is wrapped and how gradient sync is skipped."""

    def __init__(self, device: torch.device, precision: str, feed: BatchFeed = BatchFeed()) -> None:
        self.device = device
        self.feed = feed
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self.dp_rank, self.dp_size = 0, 1
        self.is_logging_rank = True
        self.native_checkpoint: NativeCheckpoint | None = None  # DCP over state_dict()

    # -- hooks for data-parallel subclasses ------------------------------------------------------
    def _wrap(self, model: nn.Module) -> nn.Module:
        return model

    def _skip_grad_sync(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def _reduce_fn(self) -> ReduceFn | None:
        return None  # parameters are whole on every rank: local sums are global sums

    # -- Strategy --------------------------------------------------------------------------------
    def setup(self, recipe: ModelRecipe, build_optimizer: OptimizerFactory, loss_fn: LossFn) -> None:
        self.module = recipe.full().to(self.device)
        self.model = self._wrap(self.module)
        self.optimizer = build_optimizer(self.module.parameters())
        self.loss_fn = loss_fn

    def forward_backward(self, micro_batches: Sequence[Batch], *, sync_grads: bool = True) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        count = len(micro_batches)
        for index, batch in enumerate(micro_batches):
            is_last = index == count - 1
            sync = self._skip_grad_sync() if not (sync_grads and is_last) else contextlib.nullcontext()
            with sync:
                loss = self._loss(batch)
                (loss / count).backward()
            total += loss.detach().float()
        return total / count

    def regularize(self, l1: float, l2: float) -> torch.Tensor:
        return add_l1_l2_(self.module.parameters(), l1, l2, self._reduce_fn())

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor | None:
        return clip_grad_norm_(self.module.parameters(), max_norm, self._reduce_fn())

    def optimizer_step(self) -> torch.Tensor | None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return None

    def discard_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> Any:
        self.model.eval()
        try:
            args, kwargs, _ = self.feed.split(to_device(batch, self.device))
            return self._forward(*args, **kwargs)
        finally:
            self.model.train()

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def state_dict(self) -> dict[str, Any]:
        # imported at the first save (see launcher/checkpoint.py)
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def close(self) -> None:
        pass  # plain torch objects: nothing outlives the process group

    def _loss(self, batch: Batch) -> torch.Tensor:
        args, kwargs, target = self.feed.split(to_device(batch, self.device))
        return self.feed.loss(self._forward(*args, **kwargs), target, self.loss_fn)

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            return self.model(*args, **kwargs)

    @property
    def model_parts(self) -> list[nn.Module]:
        return [self.module]

    @property
    def local_optimizer_state(self) -> dict[Any, dict[str, Any]]:
        return self.optimizer.state

