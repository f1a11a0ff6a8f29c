"""Gradient transforms shared by every strategy: L1/L2 regularization and global-norm clipping.

Both are elementwise or sum-reductions over local tensors, so they stay correct on sharded and
tensor-parallel parameters as long as the caller reduces the partial sums over the shard group
(`reduce_sum`); replicated strategies pass None.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

ReduceFn = Callable[[torch.Tensor], torch.Tensor]


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The shard this rank stores: a DTensor's local tensor, or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@torch.no_grad()
def add_l1_l2_(params: Iterable[torch.nn.Parameter], l1: float, l2: float,
               reduce_sum: ReduceFn | None = None) -> torch.Tensor:
    """grad += l1*sign(w) + 2*l2*w for parameters with a gradient; return l1*|w|_1 + l2*|w|_2^2."""
    pairs = ((local(p.detach()), local(p.grad)) for p in params if p.grad is not None)
    return add_l1_l2_to_pairs_(pairs, l1, l2, reduce_sum)


@torch.no_grad()
def add_l1_l2_to_pairs_(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], l1: float, l2: float,
                        reduce_sum: ReduceFn | None = None) -> torch.Tensor:
    """The transform on (weight, gradient) tensor pairs, for engines that keep gradients outside p.grad."""
    penalty = torch.zeros((), dtype=torch.float64)
    if l1 == 0 and l2 == 0:
        return penalty.float()
    for weight, grad in pairs:
        if l1:
            grad.add_(torch.sign(weight), alpha=l1)
            penalty += l1 * weight.abs().sum().double().cpu()
        if l2:
            grad.add_(weight, alpha=2 * l2)
            penalty += l2 * weight.pow(2).sum().double().cpu()
    if reduce_sum is not None:
        penalty = reduce_sum(penalty)
    return penalty.float()


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.nn.Parameter], max_norm: float | None,
                    reduce_sum: ReduceFn | None = None) -> torch.Tensor:
    """Global L2 norm of all gradients; scale them so it is at most max_norm (same rule as torch).

    Computed from per-gradient squared norms rather than torch.nn.utils.clip_grad_norm_, which
    fails when DTensor and plain parameters, or parameters on different meshes, are mixed.
    """
    grads = [local(p.grad) for p in params if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float32)
    for g in grads:
        sq += g.detach().float().pow(2).sum().cpu()
    if reduce_sum is not None:
        sq = reduce_sum(sq)
    total = sq.sqrt()
    if max_norm is not None:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if scale < 1.0:
            for g in grads:
                g.mul_(scale.to(g.device, g.dtype))
    return total
