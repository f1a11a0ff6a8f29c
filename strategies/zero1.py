"""ZeRO stage 1: DDP gradients, optimizer state sharded by torch's ZeroRedundancyOptimizer.

Parameters are partitioned by whole tensors (largest first, greedily to the least loaded rank);
each rank steps only its partition and broadcasts the result. The rank's own optimizer is
`.optim` (over its partition): checkpoints hold the state of the parameters a rank owns under their
names (strategies/single.py's flattened layout), so they load at any world size, and into any other
strategy. (`overlap_with_ddp=True` is not used: gloo refuses it.)
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from strategies.base import OptimizerFactory


def shard_optimizer(params: Iterable[nn.Parameter], build_optimizer: OptimizerFactory,
                    group: dist.ProcessGroup) -> ZeroRedundancyOptimizer:
    """The optimizer `build_optimizer` makes, with its state partitioned over `group`."""
    # The factory tells which class and hyper-parameters to shard; ZeRO builds the local copy.
    template = build_optimizer([nn.Parameter(torch.zeros(1))])
    defaults = {k: v for k, v in template.defaults.items() if k != "differentiable" or v}
    return ZeroRedundancyOptimizer(params, optimizer_class=type(template), process_group=group, **defaults)
