"""The memory allocator settings every CPU rank starts with, whichever executor starts it.

glibc's malloc serves an allocation above its mmap threshold with its own mmap and unmaps it on
free, returning the memory at once. But the threshold is dynamic: each time such a chunk is freed
it rises to that chunk's size (up to 32 MiB on 64-bit). After one training step, ZeRO's all-gather
and reduce-scatter buffers and DDP's buckets (MiBs each) come from the heap instead, where freed
ones stay resident and fragment it: measured on a 100M-parameter MLP at 2 ranks, ZeRO-3's peak RSS
was above DDP's. Setting the thresholds fixes them (and turns the dynamic rise off), so buffers
above them are returned when freed. The price is time: each such buffer is a fresh mapping to fault
in, and ZeRO-3 steps took 1.7-2.1x as long here; tcmalloc (LD_PRELOAD) had the memory without the
cost but is a system library, so it is the documented override, not the default
(docs/strategies.md, "Memory on CPU", has the measurements).

The settings travel as environment variables because glibc reads them when a process starts: the
local and Accelerate executors put them in the command's environment, Ray in its workers' runtime
environment. A variable the user set in the launcher's environment wins, variable by variable.
On CUDA ranks (tensors in the CUDA caching allocator) nothing is set.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

# glibc malloc's MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ (bytes).
CPU_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}


def allocator_env(device: str, inferred: list[str], environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The allocator variables for the ranks: the user's value where set, else ours (CPU only).
    Each value chosen here is said in `inferred`."""
    if device != "cpu":
        return {}
    chosen = {name: environ.get(name) or value for name, value in CPU_ALLOCATOR_ENV.items()}
    ours = [f"{name}={value}" for name, value in chosen.items() if not environ.get(name)]
    if ours:
        inferred.append(f"{' '.join(ours)} (not set: CPU ranks' malloc returns freed buffers above the threshold;"
                        " set it in the launcher's environment to override)")
    return chosen
