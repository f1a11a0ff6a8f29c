"""Gradient transforms shared by every strategy: L1/L2 regularization and global-norm clipping.

Both are elementwise or sum-reductions over local tensors, so they stay correct on sharded,
tensor-parallel and pipeline-split parameters as long as the caller combines the partial sums over
the right groups. Partial sums come in two parts, [over sharded DTensor pieces, over whole tensors],
because they reduce over different groups: a shard's sum adds up over its shard group, a whole
(replicated) tensor is counted once. `reduce_sum` maps this rank's pair to the global total (its
result is summed, so a plain sum over a group of all-sharded tensors also fits); replicated
strategies pass None.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

ReduceFn = Callable[[torch.Tensor], torch.Tensor]


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The shard this rank stores: a DTensor's local tensor, or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """A DTensor split over some mesh axis (a replicated DTensor holds the whole tensor, like a plain one)."""
    return any(p.is_shard() for p in getattr(tensor, "placements", ()))


def _total(parts: torch.Tensor, reduce: ReduceFn | None) -> torch.Tensor:
    return (parts if reduce is None else reduce(parts)).sum()


@torch.no_grad()
def add_l1_l2_(params: Iterable[torch.nn.Parameter], l1: float, l2: float,
               reduce_sum: ReduceFn | None = None) -> torch.Tensor:
    """grad += l1*sign(w) + 2*l2*w for parameters with a gradient; return l1*|w|_1 + l2*|w|_2^2."""
    if l1 == 0 and l2 == 0:
        return torch.zeros(())
    with_grad = [(p, p.grad) for p in params if p.grad is not None]
    parts = torch.stack([
        _l1_l2_pairs_(((local(p.detach()), local(grad)) for p, grad in with_grad if is_sharded(p) == sharded), l1, l2)
        for sharded in (True, False)
    ])
    return _total(parts, reduce_sum).float()


@torch.no_grad()
def add_l1_l2_to_pairs_(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], l1: float, l2: float,
                        reduce_sum: ReduceFn | None = None) -> torch.Tensor:
    """The transform on (weight, gradient) tensor pairs, for engines that keep gradients outside p.grad.
    All pairs are alike here: `reduce_sum` (if any) gets their one partial penalty."""
    penalty = _l1_l2_pairs_(pairs, l1, l2)
    if reduce_sum is not None:
        penalty = reduce_sum(penalty)
    return penalty.float()


def _l1_l2_pairs_(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], l1: float, l2: float) -> torch.Tensor:
    """Apply the transform in place; return this rank's partial penalty (float64, not reduced)."""
    penalty = torch.zeros((), dtype=torch.float64)
    if l1 == 0 and l2 == 0:
        return penalty
    for weight, grad in pairs:
        if l1:
            grad.add_(torch.sign(weight), alpha=l1)
            penalty += l1 * weight.abs().sum().double().cpu()
        if l2:
            grad.add_(weight, alpha=2 * l2)
            penalty += l2 * weight.pow(2).sum().double().cpu()
    return penalty


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.nn.Parameter], max_norm: float | None,
                    reduce_sum: ReduceFn | None = None) -> torch.Tensor:
    """Global L2 norm of all gradients; scale them so it is at most max_norm (same rule as torch).

    Computed from per-group squared norms rather than torch.nn.utils.clip_grad_norm_, which fails
    when DTensor and plain parameters, or parameters on different meshes, are mixed. The foreach
    kernels are one call per group instead of a few per tensor: this runs every step.
    """
    grads: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])  # sharded pieces, whole tensors
    for p in params:
        if p.grad is not None:
            grads[0 if is_sharded(p) else 1].append(local(p.grad).detach())
    parts = torch.stack([_sum_of_squares(group) for group in grads])
    total = _total(parts, reduce_sum).sqrt()
    if max_norm is not None:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if scale < 1.0:
            for group in grads:
                if group:
                    torch._foreach_mul_(group, scale.to(group[0].device, group[0].dtype))
    return total


def _sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squared entries (float32, on the CPU where the partial sums are reduced)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.stack(norms).pow(2).sum().cpu()
