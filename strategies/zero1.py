"""ZeRO stage 1: DDP gradients, optimizer state sharded by torch's ZeroRedundancyOptimizer.

Parameters are partitioned by whole tensors (largest first, greedily to the least loaded rank);
each rank steps only its partition and broadcasts the result. The rank's own optimizer is
`.optim` (over its partition): checkpoints hold the state of the parameters a rank owns under their
names (strategies/single.py's flattened layout), so they load at any world size, and into any other
strategy. (`overlap_with_ddp=True` is not used: gloo refuses it.)
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from strategies.base import OptimizerFactory


def shard_optimizer(params: Iterable[nn.Parameter], build_optimizer: OptimizerFactory,
                    group: dist.ProcessGroup) -> ZeroRedundancyOptimizer:
    """The optimizer `build_optimizer` makes, with its state partitioned over `group`."""
    # The factory tells which class and hyper-parameters to shard; ZeRO builds the local copy as
    # `cls(params, **defaults)`. An optimizer's defaults may hold keys its constructor does not take
    # (torch 2.13's AdamW records decoupled_weight_decay=True, which only Adam accepts): pass only
    # the accepted ones, then check the copy came out with the template's hyper-parameters.
    template = build_optimizer([nn.Parameter(torch.zeros(1))])
    cls = type(template)
    accepted = inspect.signature(cls).parameters
    defaults = {key: value for key, value in template.defaults.items() if key in accepted}
    sharded = ZeroRedundancyOptimizer(params, optimizer_class=cls, process_group=group, **defaults)
    if sharded.optim.defaults != template.defaults:
        raise RuntimeError(f"ZeRO-1 rebuilt {cls.__name__} with other hyper-parameters: {sharded.optim.defaults}"
                           f" instead of {template.defaults}")
    return sharded
