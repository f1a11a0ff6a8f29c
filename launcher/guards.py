"""Per-step agreement between ranks: stop for preemption, skip or stop on a non-finite loss/gradient.

One tiny all-reduce per step, so every rank takes the same branch: a rank that alone skipped an
update or left the loop would desynchronize the collectives of the next step.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist


class NonFiniteError(RuntimeError):
    """Raised on every rank when training.on_nonfinite is `stop` and a step went NaN/Inf."""


class PreemptionFlag:
    """Set by SIGTERM; the loop checkpoints at the next step boundary and exits cleanly."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> "PreemptionFlag":
        signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True


@dataclass(frozen=True)
class Verdict:
    nonfinite: bool
    preempt: bool


def check_step(loss: torch.Tensor, grad_norm: torch.Tensor | None, preemption: PreemptionFlag | None) -> Verdict:
    """grad_norm None: the engine measures it inside its step; a non-finite gradient then shows in
    the logged norm and in the next step's loss."""
    norm_bad = grad_norm is not None and not torch.isfinite(grad_norm).all()
    local_bad = norm_bad or not torch.isfinite(loss).all()
    flags = torch.tensor([float(local_bad), float(preemption is not None and preemption.requested)])
    if dist.is_initialized():
        # Over the whole world, not the data-parallel group: with pipeline/tensor parallel, ranks
        # outside one dp group must take the same branch too.
        dist.all_reduce(flags)
    return Verdict(nonfinite=bool(flags[0] > 0), preempt=bool(flags[1] > 0))
