"""`meshyard calibrate`: measure what this machine does per process when N ranks run at once.

Starts N processes (one per rank, the threads each would get in a launch), joined over the chosen
backend on 127.0.0.1, and times on every rank at once (ranks share the cores, so these are the rates
one rank gets): a square matmul in fp32 and bf16; fused causal attention forward and backward at a
few sequence lengths (on CPU it runs far below the matmul rate, in bf16 backward most of all); a
light (add) and a heavy (gelu) elementwise kernel in fp32 and bf16 on operands that are not in the
caches (a step's activations are not); on CPU, what writing newly mapped memory costs beyond
writing memory already touched (its pages fault in); the overhead of one op (a tiny forward and backward
through modules, per op dispatched); each collective the estimate counts, with the
estimate's payload convention (the all-reduced tensor, the gathered output, the reduce-scattered
input, what one rank sends); and what tensor parallel and FSDP2 add per layer and per optimizer op
on tiny layers. launcher/steptime.py prices the estimate's work at these rates. The ranks run with
glibc's own allocator settings, not a launch's (launcher/allocator.py): under a launch's 1 MiB mmap
threshold every output of a timed kernel at or above it (a 512 x 512 fp32 matmul's is 1 MiB) would
be mapped anew and fault in, slowing the kernel's rate by the page faults that the prediction
prices apart, at the first-touch rate, for the allocations a launch maps anew.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any

import torch

from launcher.profile import Measured

MATMUL_SIZE = {"cpu": 512, "cuda": 8192}
COLLECTIVE_BYTES = {"cpu": 8 << 20, "cuda": 256 << 20}
# elements per operand, operands per pool: each timed call takes the next ones, so their bytes come from memory
ELEMENTWISE_POOL = {"cpu": (1 << 20, 16), "cuda": (1 << 24, 8)}
ATTENTION_SEQ = {"cpu": (64, 256, 1024), "cuda": (512, 2048, 8192)}  # head dim 64; rates between are interpolated
ATTENTION_TOKENS = {"cpu": 1 << 12, "cuda": 1 << 17}  # batch x heads x sequence of each timed call
PRECISIONS = (("fp32", torch.float32), ("bf16", torch.bfloat16))
# a copy into a new tensor this large: above glibc's largest mmap threshold (32 MiB), so every one is mapped
# anew and faults its pages in as it is written (on a GPU the caching allocator hands back the same memory)
FIRST_TOUCH_BYTES = 64 << 20
MIN_SECONDS = 0.25  # each measurement repeats until it has run this long
WINDOWS = 3


def calibrate(world_size: int, device: str, threads_per_rank: int) -> Measured:
    """Run the measurement on `world_size` fresh processes; their result."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    backend = "nccl" if device == "cuda" else "gloo"
    # The parent holds the rendezvous store: no port to guess, and it outlives every rank.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    # read by each spawned rank's torch at import; only for the ranks: the next world size's threads
    # are chosen from the user's environment, not this one's
    threads = {"OMP_NUM_THREADS": str(threads_per_rank)}
    with tempfile.TemporaryDirectory(prefix="meshyard-calibrate-") as tmp, _environment(threads):
        out = Path(tmp) / "result.json"
        mp.start_processes(_rank, args=(world_size, store.port, backend, device, threads_per_rank, str(out)),
                           nprocs=world_size, start_method="spawn")
        result = json.loads(out.read_text())
    return Measured(backend=backend, world_size=world_size, threads_per_rank=threads_per_rank,
                    device=result["device"], matmul_flops_per_s=result["matmul"],
                    collective_bytes_per_s=result["collectives"], torch_version=torch.__version__,
                    measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    attention_flops_per_s=result["attention"], elementwise_bytes_per_s=result["elementwise"],
                    first_touch_bytes_per_s=result["first_touch"],
                    op_overhead_s=result["op_overhead"], parallel_overhead_s=result["parallel"])


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ (what spawned processes inherit) until the block ends."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _rank(rank: int, world_size: int, port: int, backend: str, device_kind: str, threads: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    device = torch.device("cuda", rank) if device_kind == "cuda" else torch.device("cpu")
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    # a short timeout: a measurement that hangs fails in minutes, not after the default half hour
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(minutes=2))
    try:
        rates: dict[str, Any] = {"matmul": {p: _matmul_rate(device, dtype) for p, dtype in PRECISIONS},
                                 "attention": _attention_rates(device), "elementwise": _elementwise_rates(device),
                                 "first_touch": _first_touch_rate(device),
                                 "op_overhead": _op_overhead(device)}
        everyone: list[Any] = [None] * world_size
        dist.all_gather_object(everyone, rates)
        collectives = _collective_rates(device, world_size) if world_size > 1 else {}
        parallel = _parallel_overheads(device, world_size) if world_size > 1 else {}
        if rank == 0:
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            Path(out).write_text(json.dumps({"device": name, "collectives": collectives, "parallel": parallel,
                                             **_mean(everyone)}))
    finally:
        dist.destroy_process_group()


def _timed(device: torch.device, work: Callable[[], object]) -> float:
    """Seconds per call of `work`: one warm-up call, one timed call to size the loop, then as many
    calls as fill MIN_SECONDS, in WINDOWS windows of which the median counts (a moment of other
    work on a shared machine slows one window, not the rate). Every rank makes the same number of
    calls (the largest any rank asks for): a collective called more often on one rank than on
    another would wait forever."""
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
    calls = -(-int(wanted.item()) // WINDOWS)
    return statistics.median(timed_calls(calls) / calls for _ in range(WINDOWS))


def _matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    n = MATMUL_SIZE[device.type]
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / _timed(device, lambda: torch.mm(a, b))


def _mean(values: list[Any]) -> Any:
    """The ranks' average of each number in their (equally nested) results."""
    if isinstance(values[0], dict):
        return {key: _mean([v[key] for v in values]) for key in values[0]}
    return sum(values) / len(values)


def _attention_rates(device: torch.device) -> dict[str, dict[str, float]]:
    """Counted FLOPs per second of causal scaled_dot_product_attention, forward and backward, per
    precision and sequence length ("fp32/forward" -> {"64": rate, ...}); FLOPs as the estimate counts them."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    rates: dict[str, dict[str, float]] = {}
    for precision, dtype in PRECISIONS:
        for seq in ATTENTION_SEQ[device.type]:
            shape = (1, ATTENTION_TOKENS[device.type] // seq, seq, 64)
            forward_s, backward_s = _attention_seconds(device, dtype, shape)
            rates.setdefault(f"{precision}/forward", {})[str(seq)] = sdpa_flop_count(shape, shape, shape) / forward_s
            rates.setdefault(f"{precision}/backward", {})[str(seq)] = (
                sdpa_backward_flop_count(shape, shape, shape, shape) / backward_s)
    return rates


def _attention_seconds(device: torch.device, dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[float, float]:
    import torch.nn.functional as F

    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=device, dtype=dtype)

    def forward() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    forward_s = _timed(device, forward)
    both_s = _timed(device, lambda: forward().backward(grad))
    return forward_s, max(both_s - forward_s, 0.1 * both_s)  # noise must not make the backward free


def _elementwise_rates(device: torch.device) -> dict[str, float]:
    """Bytes read and written per second by a light (add) and a heavy (gelu) kernel, per precision:
    on operands cycled through pools larger than the caches ("fp32/light"), as forward and backward
    read activations written long before; and on the same operands every call ("fp32/light/cached"),
    as an optimizer's dozen kernels over one parameter's tensors find them in the cache after the first."""
    rates = {}
    n, count = ELEMENTWISE_POOL[device.type]
    for precision, dtype in PRECISIONS:
        a, b, out = ([torch.randn(n, device=device, dtype=dtype) for _ in range(count)] for _ in range(3))
        size = n * a[0].element_size()
        for suffix, pools in (("", (a, b, out)), ("/cached", (a[:1], b[:1], out[:1]))):
            add, gelu = _cycling(torch.ops.aten.add.out, *pools), _cycling(torch.ops.aten.gelu.out, pools[0], pools[2])
            rates[f"{precision}/light{suffix}"] = 3 * size / _timed(device, add)
            rates[f"{precision}/heavy{suffix}"] = 2 * size / _timed(device, gelu)
    return rates


def _first_touch_rate(device: torch.device) -> float:
    """Bytes per second of newly mapped memory faulted in: a copy into a new tensor (glibc maps it
    anew and unmaps it when freed) against the same copy into one already touched. On a GPU the
    caching allocator reuses its memory: nothing to fault in."""
    if device.type == "cuda":
        return math.inf
    source, target = torch.randn(FIRST_TOUCH_BYTES // 4), torch.empty(FIRST_TOUCH_BYTES // 4)
    touched_s = _timed(device, partial(target.copy_, source))
    new_s = _timed(device, partial(_copy_to_new, source))
    return FIRST_TOUCH_BYTES / max(new_s - touched_s, 0.1 * new_s)  # noise must not make it free


def _copy_to_new(source: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(source).copy_(source)


def _cycling(kernel: Callable[..., object], *pools: list[torch.Tensor]) -> Callable[[], object]:
    """`kernel` on the next tensor of each pool at every call (the last pool is its output)."""
    index = itertools.count()

    def call() -> object:
        i = next(index)
        *inputs, out = (pool[i % len(pool)] for pool in pools)
        return kernel(*inputs, out=out)
    return call


def _op_overhead(device: torch.device) -> float:
    """Seconds per op dispatched (as launcher/opcount.py counts them) of a forward and backward through
    tiny modules: Python, module calls, the dispatcher and autograd, with almost no kernel work."""
    from torch import nn

    from launcher.opcount import WorkCounter

    model = nn.Sequential(*(layer for _ in range(4) for layer in (nn.Linear(4, 4), nn.GELU(), nn.LayerNorm(4))))
    model.to(device)
    x = torch.randn(2, 4, device=device)

    def step() -> None:
        model(x).sum().backward()

    counter = WorkCounter({})
    with counter:
        step()
    return _timed(device, step) / counter.ops


def _parallel_overheads(device: torch.device, world_size: int) -> dict[str, float]:
    """Seconds that tensor parallel and FSDP2 add over plain modules, timed on layers too small to
    have kernel work: per tensor-parallel nn.Linear and per FSDP2 unit, for the forward and backward
    of one micro-batch (DTensor dispatch, module hooks, the latency of their small collectives), and
    per optimizer op on DTensor parameters (as both leave them)."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from launcher.opcount import WorkCounter

    blocks, width = 4, 4 * world_size  # each block: a column-wise then a row-wise linear

    def model() -> nn.Sequential:
        layers = (nn.Sequential(nn.Linear(4, width), nn.Linear(width, 4)) for _ in range(blocks))
        return nn.Sequential(*layers).to(device)

    mesh = init_device_mesh(device.type, (world_size,))
    plain, tensor_parallel, fsdp = model(), model(), model()
    for block in tensor_parallel:
        parallelize_module(block, mesh, {"0": ColwiseParallel(), "1": RowwiseParallel()})
    for block in fsdp:
        fully_shard(block, mesh=mesh)
    fully_shard(fsdp, mesh=mesh)
    x = torch.randn(2, 4, device=device)
    step = {name: _timed(device, partial(_forward_backward, module, x))
            for name, module in (("plain", plain), ("tp", tensor_parallel), ("fsdp", fsdp))}
    # the gradients the timed backwards left are what the optimizers step
    plain_adam, fsdp_adam = (torch.optim.Adam(m.parameters(), lr=1e-3, foreach=False) for m in (plain, fsdp))
    counter = WorkCounter({})
    with counter:
        plain_adam.step()
    dtensor_s = _timed(device, fsdp_adam.step) - _timed(device, plain_adam.step)
    return {"tp_linear": max(0.0, step["tp"] - step["plain"]) / (2 * blocks),
            "fsdp_unit": max(0.0, step["fsdp"] - step["plain"]) / (blocks + 1),
            "dtensor_op": max(0.0, dtensor_s) / counter.ops}


def _forward_backward(module: torch.nn.Module, x: torch.Tensor) -> None:
    module(x).sum().backward()


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
             "attention        " + ", ".join(
                 f"{key} " + "/".join(f"{rate / 1e9:.1f}" for rate in by_seq.values())
                 for key, by_seq in measured.attention_flops_per_s.items())
             + " GFLOP/s at sequence " + "/".join(next(iter(measured.attention_flops_per_s.values()), {})),
             "elementwise      " + ", ".join(f"{key} {rate / gb:.1f}" for key, rate in
                                             measured.elementwise_bytes_per_s.items())
             + " GB/s per process (light: add, heavy: gelu; cached: operands in the caches)",
             f"first touch      {measured.first_touch_bytes_per_s / gb:.1f} GB/s of newly mapped memory faulted in",
             f"op overhead      {1e6 * measured.op_overhead_s:.1f} us per op dispatched"]
    if measured.parallel_overhead_s:
        overhead = {key: f"{1e6 * value:.0f}" for key, value in measured.parallel_overhead_s.items()}
        lines.append(f"parallel         {overhead['tp_linear']} us per tensor-parallel linear,"
                     f" {overhead['fsdp_unit']} us per FSDP2 unit (forward + backward), {overhead['dtensor_op']} us"
                     " more per optimizer op on DTensors")
    if measured.collective_bytes_per_s:
        lines.append("collectives      " + ", ".join(f"{op} {rate / gb:.2f} GB/s" for op, rate in
                                                    measured.collective_bytes_per_s.items()) + " (payload)")
    return "\n".join(lines)
