"""Per-step agreement between ranks: stop for preemption, skip or stop on a non-finite loss/gradient.

Every rank must take the same branch: a rank that alone skipped an update or left the loop would
desynchronize the collectives of the next step.
"""
from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


class NonFiniteError(RuntimeError):
    """Raised on every rank when training.on_nonfinite is `stop` and a step went NaN/Inf."""


class PreemptionFlag:
    """Set by SIGTERM; the loop checkpoints at the next step boundary and exits cleanly."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> "PreemptionFlag":
        """Only the main thread may set signal handlers: under Ray Train the loop runs in another
        thread, and Ray itself owns the worker's signals (preemption there is Ray's business)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True


@dataclass(frozen=True)
class Verdict:
    nonfinite: bool
    preempt: bool


class StepAgreement:
    """Every rank takes the same branch at every step, without a round trip on the hot path.

    - Non-finite: judged from the gradient norm, which every strategy reports as the global norm,
      identical on every rank (a NaN/Inf loss makes its gradients NaN/Inf). Where the engine measures
      the norm only inside its own step (DeepSpeed ZeRO >= 1), the ranks vote on the loss instead,
      with a blocking all-reduce.
    - Preemption: each step's vote is an async all-reduce over the whole world, started at this step
      and read at the next, so it overlaps a whole step of compute; a SIGTERM is acted on one step
      later than it arrived.
    """

    def __init__(self, preemption: PreemptionFlag | None) -> None:
        self.preemption = preemption
        self._pending: tuple[Any, torch.Tensor] | None = None

    def verdict(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> Verdict:
        preempt = self._collect()
        requested = self.preemption is not None and self.preemption.requested
        flag = torch.tensor([float(requested)])
        self._pending = (dist.all_reduce(flag, async_op=True) if dist.is_initialized() else None, flag)
        if grad_norm is not None:
            nonfinite = not bool(torch.isfinite(grad_norm).all())
        else:
            nonfinite = _any_rank(not bool(torch.isfinite(loss).all()))
        return Verdict(nonfinite=nonfinite, preempt=preempt)

    def finish(self) -> None:
        """Complete the last vote in flight (every rank started it) before the loop ends."""
        self._collect()

    def _collect(self) -> bool:
        if self._pending is None:
            return False
        work, flag = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        return bool(flag[0] > 0)


def _any_rank(local: bool) -> bool:
    flag = torch.tensor([float(local)])
    if dist.is_initialized():
        dist.all_reduce(flag)
    return bool(flag[0] > 0)
