"""Gradient transforms shared by every strategy: L1/L2 regularization and global-norm clipping.

Both are elementwise or sums over local tensors, so they need no gathering on sharded, tensor-parallel
or pipeline-split parameters. A parameter is a plain tensor (whole wherever it lives) or a DTensor
(FSDP, tensor parallel, or both: sharded or replicated over mesh axes). Parameters are grouped by
(mesh, placements): a group's sum is taken over local tensors and made global once per group
(`DTensor.full_tensor()`), a plain group counts once. Pipeline stages hold different parameters, so
their totals are added by `stage_sum` (None without a pipeline).

torch.nn.utils.clip_grad_norm_ cannot take the mix in one call (it fails when DTensors on different
meshes, or DTensors and plain tensors, meet in one foreach kernel): the norm is its public halves,
`get_total_norm` (of each group's local tensors, squared and made global like the penalty) and
`clip_grads_with_norm_`, applied per group.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate

StageSum = Callable[[torch.Tensor], torch.Tensor]
GroupKey = tuple[DeviceMesh, tuple[Placement, ...]] | None  # None: plain tensors


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The shard this rank stores: a DTensor's local tensor, or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _groups(params: Iterable[torch.nn.Parameter]) -> dict[GroupKey, list[torch.nn.Parameter]]:
    """Parameters with a gradient by (mesh, placements); plain tensors under None."""
    groups: dict[GroupKey, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.grad is not None:
            key = (p.device_mesh, tuple(p.placements)) if isinstance(p, DTensor) else None
            groups.setdefault(key, []).append(p)
    return groups


def _global(partial: torch.Tensor, key: GroupKey) -> torch.Tensor:
    """A group's sum over local tensors -> its sum over the whole parameters (on the CPU): summed over
    the mesh axes the group is sharded on, counted once over those it is replicated on."""
    if key is None:
        return partial
    mesh, placements = key
    # Any split (Shard, FSDP-over-TP's _StridedShard) holds a part of the sum; a replica holds all of it.
    as_partial = [Replicate() if placement.is_replicate() else Partial() for placement in placements]
    dtensor = DTensor.from_local(partial.to(mesh.device_type), mesh, as_partial, run_check=False)
    return dtensor.full_tensor().cpu()


@torch.no_grad()
def add_l1_l2_(params: Iterable[torch.nn.Parameter], l1: float, l2: float,
               stage_sum: StageSum | None = None) -> torch.Tensor:
    """grad += l1*sign(w) + 2*l2*w for parameters with a gradient; return l1*|w|_1 + l2*|w|_2^2."""
    if l1 == 0 and l2 == 0:
        return torch.zeros(())
    total = torch.zeros((), dtype=torch.float64)
    for key, group in _groups(params).items():
        pairs = ((local(p.detach()), local(p.grad)) for p in group if p.grad is not None)
        total += _global(_l1_l2_pairs_(pairs, l1, l2), key)
    return (total if stage_sum is None else stage_sum(total)).float()


@torch.no_grad()
def add_l1_l2_to_pairs_(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], l1: float, l2: float,
                        reduce_sum: StageSum | None = None) -> torch.Tensor:
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
                    stage_sum: StageSum | None = None) -> torch.Tensor:
    """Global L2 norm of all gradients (float32, CPU); scale them so it is at most max_norm (torch's
    rule: by max_norm / (norm + 1e-6) when that is below 1)."""
    groups = _groups(params)
    squares = torch.zeros((), dtype=torch.float32)
    for key, group in groups.items():
        # This rank's shards, made global on the mesh's device: FSDP2's CPU offload keeps DTensor
        # gradients in host memory, which an NCCL-only process group cannot reduce.
        norm = torch.nn.utils.get_total_norm([local(p.grad) for p in group if p.grad is not None])
        squares += _global(norm.float().square(), key).cpu()
    total = (squares if stage_sum is None else stage_sum(squares)).sqrt()
    if max_norm is not None:
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
