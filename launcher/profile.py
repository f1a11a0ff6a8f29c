"""This machine's measured speed, stored per host in the user's cache, and the peak FLOP/s that MFU
is measured against.

`meshyard calibrate` (launcher/calibrate.py) writes one entry per (backend, world size): ranks that
compute together share the cores, so a matmul's FLOP/s per process depends on how many there are.
The plan predicts a step time from the entry for its own backend and world size; the metrics' MFU
divides by the device's peak: a datasheet table for common GPUs, the calibrated number on CPU.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

# Dense datasheet peaks per GPU, FLOP/s: bf16 tensor cores, and fp32 without TF32 (torch's default
# for matmuls). Matched on torch.cuda.get_device_name(), first match wins (A100 before A10).
GPU_PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756e12, "fp32": 51.2e12}),
    ("H100", {"bf16": 989e12, "fp32": 66.9e12}),
    ("H200", {"bf16": 989e12, "fp32": 66.9e12}),
    ("A100", {"bf16": 312e12, "fp32": 19.5e12}),
    ("A10G", {"bf16": 125e12, "fp32": 31.2e12}),
    ("A10", {"bf16": 125e12, "fp32": 31.2e12}),
    ("L40S", {"bf16": 362e12, "fp32": 91.6e12}),
    ("L4", {"bf16": 121e12, "fp32": 30.3e12}),
    ("RTX 4090", {"bf16": 165e12, "fp32": 82.6e12}),
    ("RTX 3090", {"bf16": 71e12, "fp32": 35.6e12}),
    ("V100", {"fp32": 15.7e12}),
    ("T4", {"fp32": 8.1e12}),
)


@dataclass(frozen=True)
class Measured:
    """One calibration: `world_size` processes of `threads_per_rank` threads each, all busy at once."""

    backend: str
    world_size: int
    threads_per_rank: int
    device: str  # "cpu" or the GPU's name
    matmul_flops_per_s: dict[str, float]  # per process, by precision (fp32, bf16)
    collective_bytes_per_s: dict[str, float]  # payload per second: all_reduce, all_gather, reduce_scatter, ...
    torch_version: str
    measured_at: str
    # "fp32/forward" -> {sequence length: counted FLOPs per second} of causal attention (head dim 64)
    attention_flops_per_s: dict[str, dict[str, float]]
    # "fp32/light" (add), "fp32/heavy" (gelu), "bf16/light", ... on operands from memory; "fp32/light/cached", ...
    # on operands in the caches
    elementwise_bytes_per_s: dict[str, float]
    # bytes of newly mapped memory faulted in per second as they are first written (CPU; inf on GPUs)
    first_touch_bytes_per_s: float
    op_overhead_s: float  # per op dispatched: Python, modules, dispatcher, autograd
    # added per tensor-parallel linear ("tp_linear") and FSDP2 unit ("fsdp_unit") per micro-batch, and per
    # optimizer op on DTensor parameters ("dtensor_op"); empty at world size 1
    parallel_overhead_s: dict[str, float]

    @property
    def key(self) -> str:
        return entry_key(self.backend, self.world_size)


def entry_key(backend: str, world_size: int) -> str:
    return f"{backend}/{world_size}"


def profile_path() -> Path:
    """$XDG_CACHE_HOME/meshyard/profile-<host>.json (~/.cache when unset): one file per host, so a
    home directory shared by several machines keeps each one's numbers."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "meshyard" / f"profile-{socket.gethostname()}.json"


def _entries(path: Path) -> dict[str, dict]:
    try:
        entries = json.loads(path.read_text()).get("entries", {})
    except (OSError, ValueError, AttributeError):  # no profile yet, or a file this version cannot read
        return {}
    return entries if isinstance(entries, dict) else {}


def load_measured(backend: str, world_size: int, path: Path | None = None) -> Measured | None:
    """This host's calibration for `backend` at `world_size`, if `meshyard calibrate` made one."""
    entry = _entries(path or profile_path()).get(entry_key(backend, world_size))
    try:
        return Measured(**entry) if isinstance(entry, dict) else None
    except TypeError:  # written by another version: calibrate again
        return None


def save_measured(measured: Measured, path: Path | None = None) -> Path:
    """Adds (or replaces) one entry of this host's profile; the file is replaced whole."""
    from launcher.atomic import write_text_atomic

    path = path or profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = {**_entries(path), measured.key: asdict(measured)}
    write_text_atomic(path, json.dumps({"host": socket.gethostname(), "entries": entries}, indent=1, sort_keys=True))
    return path


def gpu_peak_flops(device_name: str, precision: str) -> float | None:
    for marker, peaks in GPU_PEAK_FLOPS:
        if marker in device_name:
            return peaks.get(precision)
    return None


def peak_flops_per_s(device: str, precision: str, backend: str, world_size: int) -> tuple[float, str] | None:
    """One rank's peak FLOP/s and where the number comes from; None when unknown (no MFU then).
    `device` is "cpu" or a CUDA device's name."""
    if device != "cpu":
        peak = gpu_peak_flops(device, precision)
        return None if peak is None else (peak, f"{device} datasheet")
    measured = load_measured(backend, world_size)
    if measured is None or precision not in measured.matmul_flops_per_s:
        return None
    return measured.matmul_flops_per_s[precision], f"calibrated ({measured.key}, {measured.measured_at})"
