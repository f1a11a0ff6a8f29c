"""One process, no process group: the reference every other strategy is held to.

Its checkpoint layout is every DCP strategy's: the model by parameter name, and the optimizer
flattened to one entry per parameter (`state.<name>.<key>`, `param_groups.<name>.<key>`), so a rank
saves and loads exactly the parameters it holds (a pipeline stage, a ZeRO-1 partition) and any
layout resumes in any other.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from strategies.base import Batch, LossFn, NativeCheckpoint, OptimizerFactory
from strategies.batch import BatchFeed, to_device
from strategies.checkpointing import checkpoint_layer, checkpointed_layers
from strategies.compilation import compile_layer
from strategies.grads import StageSum, add_l1_l2_, clip_grad_norm_
from strategies.layers import find_layers
from strategies.model_init import ModelRecipe


class SingleProcessStrategy:
    """Plain training. The composed strategy (strategies/composed.py) changes how the model is
    built and wrapped, how gradient sync is skipped and how sums cross pipeline stages."""

    def __init__(self, device: torch.device, precision: str, feed: BatchFeed = BatchFeed(),
                 layers_path: str | None = None) -> None:
        self.device = device
        self.feed = feed
        self.layers_path = layers_path  # model.layers: the repeated layers checkpointed and compiled
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self.dp_rank, self.dp_size = 0, 1
        self.is_logging_rank = True
        self.native_checkpoint: NativeCheckpoint | None = None  # DCP over state_dict()

    # -- hooks for the composed strategy ---------------------------------------------------------
    def _skip_grad_sync(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def _stage_sum(self) -> StageSum | None:
        return None  # no pipeline stages: this rank's totals cover every parameter

    @property
    def _local_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over the parameters whose state this rank stores."""
        return self.optimizer

    def _model_layers(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        """(path, list) of the model's repeated layers; ValueError naming model.layers when there are none."""
        found = find_layers(model, self.layers_path)
        if found is None:
            raise ValueError(f"model.layers: {type(model).__name__} has no list of repeated layers (an nn.ModuleList"
                             " of one class) for activation checkpointing or compile; name it with model.layers")
        return found

    @staticmethod
    def _wrap_layers(recipe: ModelRecipe, model_layers: Iterable[nn.Module], part_layers: Iterable[nn.Module]) -> None:
        """Activation checkpointing, then compile, on one model part's repeated layers (torchtitan's
        order: after tensor parallel, before data parallel). Every k-th layer counts over the whole
        model's list, so pipeline stages checkpoint the layers one process would."""
        part_layers = list(part_layers)
        mine = {id(layer) for layer in part_layers}
        for layer in checkpointed_layers(model_layers, recipe.activation_checkpointing):
            if id(layer) in mine:
                checkpoint_layer(layer)
        if recipe.compile:
            for layer in part_layers:
                compile_layer(layer)

    # -- Strategy --------------------------------------------------------------------------------
    def setup(self, recipe: ModelRecipe, build_optimizer: OptimizerFactory, loss_fn: LossFn) -> None:
        self.module = self.model = recipe.full().to(self.device)
        if recipe.wraps_layers:
            _, model_layers = self._model_layers(self.module)
            self._wrap_layers(recipe, model_layers, model_layers)
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
        return add_l1_l2_(self.module.parameters(), l1, l2, self._stage_sum())

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor | None:
        return clip_grad_norm_(self.module.parameters(), max_norm, self._stage_sum())

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
        # imported at the first save (see launcher/checkpoint.py); a fresh optimizer's state is
        # created here, so a load has tensors to read into
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {"model": get_model_state_dict(self.module),
                "optim": get_optimizer_state_dict(self.module, self._local_optimizer, options=_flat())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(self.module, state["model"])
        set_optimizer_state_dict(self.module, self._local_optimizer, state["optim"], options=_flat())

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
        return self._local_optimizer.state


def _flat() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)

