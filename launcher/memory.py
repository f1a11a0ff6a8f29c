"""Model-state memory: what a rank actually stores, and what ZeRO says it should (fp32).

Theory per parameter (bytes, fp32 weights, N data-parallel ranks, o = optimizer state bytes):
    replicated (single, ddp): params 4, grads 4, optimizer o
    ZeRO-1:                   params 4, grads 4, optimizer o/N
    ZeRO-2:                   params 4, grads 4/N, optimizer o/N
    ZeRO-3:                   params 4/N, grads 4/N, optimizer o/N
with o = 8 for adam/adamw (two moments), 4 for sgd with momentum or rmsprop (+4 with momentum).

That accounting (`mem_*_bytes` in metrics) is what the strategy keeps, not what the process holds:
the allocator, activations, collective buffers and DDP's gradient buckets come on top. The
process's own numbers are logged beside it: `peak_rss_bytes` (the high-water mark of resident
memory since the rank started), `rss_before_model_bytes` (resident memory just before the model
was built: interpreter, torch, data loading code), and on CUDA the caching allocator's peaks.
"""
from __future__ import annotations

import resource
from collections.abc import Iterable

import psutil
import torch

from launcher.spec.schema import OptimizerSpec
from strategies.grads import local


def optimizer_state_bytes_per_param(spec: OptimizerSpec) -> int:
    if spec.name in ("adam", "adamw"):
        return 8
    if spec.name == "sgd":
        return 4 if spec.momentum > 0 else 0
    return 4 + (4 if spec.momentum > 0 else 0)  # rmsprop: square average (+ momentum buffer)


def theory_bytes_per_param(strategy: str, stage: int | None, dp_size: int,
                           optimizer: OptimizerSpec) -> dict[str, float]:
    o = optimizer_state_bytes_per_param(optimizer)
    n = dp_size
    if strategy not in ("zero", "deepspeed") or not stage:  # DeepSpeed's stage 0 is plain data parallel
        return {"params": 4, "grads": 4, "optim": o}
    return {"params": 4 / n if stage == 3 else 4, "grads": 4 / n if stage >= 2 else 4, "optim": o / n}


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def model_state_bytes(parameters: list[torch.nn.Parameter], optimizer_state: dict) -> dict[str, int]:
    """Bytes this rank stores for parameters, gradients and optimizer state (per-parameter tensors
    only: scalar step counters are bookkeeping, not model state)."""
    optim_tensors = [v for state in optimizer_state.values() for v in state.values()
                     if isinstance(v, torch.Tensor) and v.ndim > 0]
    return {
        "params": _bytes(parameters),
        "grads": _bytes(p.grad for p in parameters if p.grad is not None),
        "optim": _bytes(optim_tensors),
    }


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    """Resident memory now (the peak is `peak_rss_bytes`)."""
    return psutil.Process().memory_info().rss


def cuda_peak_bytes(device: torch.device) -> dict[str, int]:
    """The CUDA caching allocator's high-water marks since the rank started: what tensors held
    (`allocated`) and what the allocator kept from the driver (`reserved`); nothing on CPU."""
    if device.type != "cuda":
        return {}
    return {"cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved(device)}
