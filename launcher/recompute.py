"""What activation checkpointing (`training.activation_checkpointing`) does to one traced micro-batch.

The trace is made without checkpointing; this adjusts it per trace segment ([before the layers,
layer 0, ..., layer n-1, after], launcher/trace.py). A checkpointed layer runs under non-reentrant
`torch.utils.checkpoint`: from forward it keeps only its input (the previous layer's output, or what
the segment before the layers hands the first), and when backward reaches it, it runs its forward
again, holding its own saved tensors until its backward is done. Layers recompute one at a time, so
a rank holds at most one layer's recomputed activations beside the checkpointed inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

from launcher.opcount import Work
from launcher.trace import Trace
from strategies.checkpointing import layer_interval


@dataclass(frozen=True)
class Recompute:
    """Per trace segment: what it keeps for backward, and what it recomputes in backward."""

    saved_bytes: tuple[int, ...]  # a checkpointed layer: its input; every other segment: as traced
    recompute_bytes: tuple[int, ...]  # a checkpointed layer's traced saved bytes, live while it recomputes
    recompute_flops: tuple[int, ...]  # a checkpointed layer's forward, run again in backward
    recompute_work: tuple[Work, ...]  # the kernels of that forward (launcher/opcount.py)

    def peak_recompute_bytes(self, segments: list[int]) -> int:
        """The largest recompute among `segments` (one layer at a time)."""
        return max((self.recompute_bytes[i] for i in segments), default=0)


def recompute(trace: Trace, policy: str) -> Recompute:
    """`trace` under `policy` (none, full, every_<k>: the k-th, 2k-th, ... layer, as strategies/checkpointing.py)."""
    interval = layer_interval(policy)
    checkpointed = {i + 1 for i in range(len(trace.input_bytes)) if interval and (i + 1) % interval == 0}
    none = (0,) * len(trace.saved_bytes)
    if not checkpointed:
        return Recompute(trace.saved_bytes, none, none, (Work(),) * len(none))
    return Recompute(
        saved_bytes=tuple(trace.input_bytes[i - 1] if i in checkpointed else size
                          for i, size in enumerate(trace.saved_bytes)),
        recompute_bytes=tuple(size if i in checkpointed else 0 for i, size in enumerate(trace.saved_bytes)),
        recompute_flops=tuple(flops if i in checkpointed else 0 for i, flops in enumerate(trace.forward_flops)),
        recompute_work=tuple(work if i in checkpointed else Work() for i, work in enumerate(trace.forward_work)))
