"""`meshyard calibrate`: measure what this machine does per process when N ranks run at once.

Starts N processes (one per rank, the threads each would get in a launch), joined over the chosen
backend on 127.0.0.1, and times: a square matmul in fp32 and bf16 on every rank at once (ranks share
the cores, so this is the FLOP/s one rank gets), an elementwise update (the optimizer's memory
traffic), and each collective the estimate counts, with the estimate's payload convention (the
all-reduced tensor, the gathered output, the reduce-scattered input, what one rank sends).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import torch

from launcher.profile import Measured

MATMUL_SIZE = {"cpu": 512, "cuda": 8192}
COLLECTIVE_BYTES = {"cpu": 8 << 20, "cuda": 256 << 20}
MIN_SECONDS = 0.25  # each measurement repeats until it has run this long


def calibrate(world_size: int, device: str, threads_per_rank: int) -> Measured:
    """Run the measurement on `world_size` fresh processes; their result."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    backend = "nccl" if device == "cuda" else "gloo"
    # The parent holds the rendezvous store: no port to guess, and it outlives every rank.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    os.environ["OMP_NUM_THREADS"] = str(threads_per_rank)  # read by each spawned rank's torch at import
    with tempfile.TemporaryDirectory(prefix="meshyard-calibrate-") as tmp:
        out = Path(tmp) / "result.json"
        mp.start_processes(_rank, args=(world_size, store.port, backend, device, threads_per_rank, str(out)),
                           nprocs=world_size, start_method="spawn")
        result = json.loads(out.read_text())
    return Measured(backend=backend, world_size=world_size, threads_per_rank=threads_per_rank,
                    device=result["device"], matmul_flops_per_s=result["matmul"], memory_bytes_per_s=result["memory"],
                    collective_bytes_per_s=result["collectives"], torch_version=torch.__version__,
                    measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _rank(rank: int, world_size: int, port: int, backend: str, device_kind: str, threads: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    device = torch.device("cuda", rank) if device_kind == "cuda" else torch.device("cpu")
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    # a short timeout: a measurement that hangs fails in minutes, not after the default half hour
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(minutes=2))
    try:
        rates: dict[str, Any] = {"matmul": {p: _matmul_rate(device, dtype) for p, dtype in (("fp32", torch.float32),
                                                                            ("bf16", torch.bfloat16))},
                 "memory": _memory_rate(device)}
        everyone: list[Any] = [None] * world_size
        dist.all_gather_object(everyone, rates)
        collectives = _collective_rates(device, world_size) if world_size > 1 else {}
        if rank == 0:
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            Path(out).write_text(json.dumps({
                "device": name, "collectives": collectives,
                "matmul": {p: sum(r["matmul"][p] for r in everyone) / world_size for p in rates["matmul"]},
                "memory": sum(r["memory"] for r in everyone) / world_size}))
    finally:
        dist.destroy_process_group()


def _timed(device: torch.device, work: Callable[[], object]) -> float:
    """Seconds per call of `work`: one warm-up call, one timed call to size the loop, then as many
    calls as fill MIN_SECONDS. Every rank makes the same number of calls (the largest any rank
    asks for): a collective called more often on one rank than on another would wait forever."""
    import torch.distributed as dist

    def timed_calls(count: int) -> float:
        dist.barrier()  # every rank starts together: the rate is the one a rank gets while the others work too
        start = time.perf_counter()
        for _ in range(count):
            work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    work()
    wanted = torch.tensor([max(3, math.ceil(MIN_SECONDS / max(timed_calls(1), 1e-6)))], device=device)
    dist.all_reduce(wanted, op=dist.ReduceOp.MAX)
    calls = int(wanted.item())
    return timed_calls(calls) / calls


def _matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    n = MATMUL_SIZE[device.type]
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / _timed(device, lambda: torch.mm(a, b))


def _memory_rate(device: torch.device) -> float:
    """Bytes per second of `a += 0.5 * b` (reads two tensors, writes one), as optimizer updates do."""
    a, b = (torch.zeros(COLLECTIVE_BYTES[device.type] // 4, device=device) for _ in range(2))
    return 3 * a.numel() * 4 / _timed(device, lambda: a.add_(b, alpha=0.5))


def _collective_rates(device: torch.device, world_size: int) -> dict[str, float]:
    import torch.distributed as dist

    size = COLLECTIVE_BYTES[device.type]
    whole = torch.zeros(size // 4, device=device)
    part = torch.zeros(whole.numel() // world_size, device=device)
    whole = whole[:part.numel() * world_size]
    rank = dist.get_rank()

    def send_recv() -> None:
        for request in dist.batch_isend_irecv([dist.P2POp(dist.isend, whole, (rank + 1) % world_size),
                                               dist.P2POp(dist.irecv, part.new_empty(whole.shape),
                                                          (rank - 1) % world_size)]):
            request.wait()

    work = {"all_reduce": lambda: dist.all_reduce(whole),
            "all_gather": lambda: dist.all_gather_single(whole, part),
            "reduce_scatter": lambda: dist.reduce_scatter_single(part, whole),
            "broadcast": lambda: dist.broadcast(whole, src=0),
            "send_recv": send_recv}
    payload = whole.numel() * 4
    return {name: payload / _timed(device, call) for name, call in work.items()}


def describe(measured: Measured) -> str:
    gb = 1e9
    lines = [f"calibrated {measured.key}: {measured.world_size} process(es) x {measured.threads_per_rank} thread(s)"
             f" on {measured.device}",
             "matmul           " + ", ".join(f"{p} {rate / 1e9:.1f} GFLOP/s" for p, rate in
                                             measured.matmul_flops_per_s.items()) + " per process",
             f"memory           {measured.memory_bytes_per_s / gb:.2f} GB/s per process (elementwise update)"]
    if measured.collective_bytes_per_s:
        lines.append("collectives      " + ", ".join(f"{op} {rate / gb:.2f} GB/s" for op, rate in
                                                    measured.collective_bytes_per_s.items()) + " (payload)")
    return "\n".join(lines)
