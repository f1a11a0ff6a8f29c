"""Per-step agreement between ranks: stop for preemption, skip or stop on a non-finite loss/gradient.

Every rank must take the same branch: a rank that alone skipped an update or left the loop would
desynchronize the collectives of the next step.
"""
from __future__ import annotations

import signal
import threading
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
    """Every rank's vote on this step, collected by one all-reduce over the whole world.

    Started right after the backward and read before the optimizer step, so the all-reduce runs on
    gloo's thread while the main thread regularizes and clips: the agreement costs no round trip of
    its own. The gradient norm needs no vote: every strategy reports the global norm, identical on
    every rank.
    """

    def __init__(self, loss: torch.Tensor, preemption: PreemptionFlag | None) -> None:
        loss_bad = not bool(torch.isfinite(loss).all())
        self.flags = torch.tensor([float(loss_bad), float(preemption is not None and preemption.requested)])
        self.work = dist.all_reduce(self.flags, async_op=True) if dist.is_initialized() else None

    def verdict(self, grad_norm: torch.Tensor | None) -> Verdict:
        """grad_norm None: the engine measures it inside its step; a non-finite gradient then shows
        in the logged norm and in the next step's loss."""
        if self.work is not None:
            self.work.wait()
        norm_bad = grad_norm is not None and not bool(torch.isfinite(grad_norm).all())
        return Verdict(nonfinite=norm_bad or bool(self.flags[0] > 0), preempt=bool(self.flags[1] > 0))
