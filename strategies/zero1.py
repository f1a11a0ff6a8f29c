"""ZeRO stage 1: DDP gradients, optimizer state sharded by torch's ZeroRedundancyOptimizer.

Parameters are partitioned by whole tensors (largest first, greedily to the least loaded rank);
each rank steps only its partition and broadcasts the result. Checkpoints stay sharded with no
gather: each rank writes the optimizer state of the parameters it owns under their names, and on
load (at any world size) reads back the names it owns in the new partition.
(`overlap_with_ddp=True` is not used: gloo refuses it.)
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import _init_optim_state, get_model_state_dict, set_model_state_dict
from torch.distributed.optim import ZeroRedundancyOptimizer

from strategies.base import LossFn, OptimizerFactory
from strategies.ddp import DDPStrategy
from strategies.model_init import ModelRecipe


class ZeroOneStrategy(DDPStrategy):
    optimizer: ZeroRedundancyOptimizer

    def setup(self, recipe: ModelRecipe, build_optimizer: OptimizerFactory, loss_fn: LossFn) -> None:
        self.module = recipe.full().to(self.device)
        self.model = self._wrap(self.module)
        # The factory tells which class and hyper-parameters to shard; ZeRO builds the local copy.
        template = build_optimizer([nn.Parameter(torch.zeros(1))])
        defaults = {k: v for k, v in template.defaults.items() if k != "differentiable" or v}
        self.optimizer = ZeroRedundancyOptimizer(self.module.parameters(), optimizer_class=type(template), **defaults)
        self.loss_fn = loss_fn

    @property
    def local_optimizer_state(self) -> dict[Any, dict[str, Any]]:
        return self.optimizer.optim.state  # the wrapper's own .state stays empty

    def _owned(self) -> dict[str, nn.Parameter]:
        mine = {id(p) for group in self.optimizer.optim.param_groups for p in group["params"]}
        return {name: p for name, p in self.module.named_parameters() if id(p) in mine}

    def state_dict(self) -> dict[str, Any]:
        _init_optim_state(self.optimizer.optim)  # so a fresh optimizer offers tensors to load into
        local = self.optimizer.optim.state
        return {"model": get_model_state_dict(self.model),
                "optim": {"state": {name: dict(local[p]) for name, p in self._owned().items()}}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state["model"])
        for name, param in self._owned().items():
            self.optimizer.optim.state[param] = state["optim"]["state"][name]
