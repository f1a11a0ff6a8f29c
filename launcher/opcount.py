"""What a run of aten ops asks of the machine, in the units `meshyard calibrate` measures rates for.

A TorchDispatchMode sees every kernel a forward, a backward or an optimizer step runs (on fake
tensors in the estimate, on real ones in calibrate) and sorts it into:
- matrix multiplies (FLOPs, by dtype), priced at the calibrated matmul rate;
- fused attention kernels (FLOPs, by dtype, direction and sequence length): on CPU they run well
  below the matmul rate, and their backward in bf16 far below;
- every other kernel (bytes read and written, by dtype and class): "heavy" kernels, whose
  per-element arithmetic (transcendentals, normalization statistics) costs more than their memory
  traffic on CPU, and "light" ones (adds, multiplies, copies, casts, reductions);
- the number of ops dispatched, views included: each pays Python and dispatcher overhead;
- the tensors ops allocate, by size: on CPU, glibc serves an allocation at or above its mmap
  threshold with a new mapping whose pages fault in as they are first written (launcher/allocator.py).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

if TYPE_CHECKING:
    from launcher.spec.schema import OptimizerSpec

# priced at the rate calibrate measures for gelu; every other non-matmul kernel at the rate of an add
HEAVY = frozenset({
    "gelu", "gelu_backward", "silu", "silu_backward", "sigmoid", "sigmoid_backward", "tanh", "tanh_backward",
    "exp", "exp2", "expm1", "log", "log1p", "log2", "erf", "erfinv", "sqrt", "rsqrt", "pow", "sin", "cos",
    "_softmax", "_softmax_backward_data", "_log_softmax", "_log_softmax_backward_data", "logsumexp",
    "native_layer_norm", "native_layer_norm_backward", "_fused_rms_norm", "_fused_rms_norm_backward",
    "native_group_norm", "native_group_norm_backward", "native_batch_norm", "native_batch_norm_backward",
    "_native_batch_norm_legit", "_native_batch_norm_legit_no_training", "mish", "mish_backward", "elu",
    "elu_backward", "softplus", "softplus_backward", "hardswish", "hardswish_backward", "var_mean", "std_mean",
})
# ops that allocate or read a scalar: no traffic worth a rate
NO_DATA = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense"})


@dataclass(frozen=True)
class Work:
    """Kernel work of some ops. Keys are strings so that `meshyard plan --json` can carry it."""

    matmul_flops: dict[str, float] = field(default_factory=dict)  # by dtype: "fp32", "bf16"
    attention_flops: dict[str, float] = field(default_factory=dict)  # "bf16/backward/64": dtype/direction/seq
    elementwise_bytes: dict[str, float] = field(default_factory=dict)  # "fp32/light", "bf16/heavy", ...
    ops: float = 0.0
    allocated_bytes: dict[str, float] = field(default_factory=dict)  # size of one allocation (bytes) -> bytes in all

    def __add__(self, other: Work) -> Work:
        return Work(_merge(self.matmul_flops, other.matmul_flops), _merge(self.attention_flops, other.attention_flops),
                    _merge(self.elementwise_bytes, other.elementwise_bytes), ops=self.ops + other.ops,
                    allocated_bytes=_merge(self.allocated_bytes, other.allocated_bytes))

    def __sub__(self, other: Work) -> Work:
        return self + other.scaled(-1.0)

    def scaled(self, factor: float) -> Work:
        return Work({k: v * factor for k, v in self.matmul_flops.items()},
                    {k: v * factor for k, v in self.attention_flops.items()},
                    {k: v * factor for k, v in self.elementwise_bytes.items()}, ops=self.ops * factor,
                    allocated_bytes={k: v * factor for k, v in self.allocated_bytes.items()})

    def first_touch_bytes(self, threshold: int | None) -> float:
        """Bytes allocated in tensors of at least `threshold` bytes (None: no allocation faults in)."""
        return 0.0 if threshold is None else sum(v for k, v in self.allocated_bytes.items() if int(k) >= threshold)

    @property
    def flops(self) -> float:
        return sum(self.matmul_flops.values()) + sum(self.attention_flops.values())


def _merge(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {key: a.get(key, 0.0) + b.get(key, 0.0) for key in {**a, **b}}


def storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    """(identity of the storage, its bytes): views of one storage hold its memory once."""
    from torch.multiprocessing.reductions import StorageWeakRef

    try:
        storage = tensor.untyped_storage()
        return StorageWeakRef(storage).cdata, storage.nbytes()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without a plain storage
        return id(tensor), tensor.numel() * tensor.element_size()


def dtype_key(dtype: torch.dtype) -> str:
    """The calibrated precision a dtype runs at: half types at bf16's rates, everything else at fp32's."""
    return "bf16" if dtype in (torch.bfloat16, torch.float16) else "fp32"


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def _bytes_read(tensor: torch.Tensor) -> int:
    """The distinct elements an input addresses: a broadcast (stride 0) dimension is read once."""
    distinct = math.prod(size for size, stride in zip(tensor.shape, tensor.stride()) if stride != 0)
    return min(distinct * tensor.element_size(), storage_key(tensor)[1])


class WorkCounter(TorchDispatchMode):
    """Tallies the Work of every op dispatched under it. `flop_formulas` maps op packets to FLOP
    formulas (torch's flop_counter registry, with meshyard's CPU attention entries): the same count
    as the trace's FlopCounterMode, split by kind and dtype."""

    def __init__(self, flop_formulas: dict[Any, Callable[..., int]]) -> None:
        super().__init__()
        self.formulas = flop_formulas
        self.matmul: Counter[str] = Counter()
        self.attention: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.allocated: Counter[str] = Counter()
        self.ops = 0

    @property
    def work(self) -> Work:
        return Work(dict(self.matmul), dict(self.attention), dict(self.bytes), ops=float(self.ops),
                    allocated_bytes=dict(self.allocated))

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace != "prim":  # metadata queries (prim.device, ...) are no kernels
            self._count(func, args, kwargs, out)
        return out

    def _count(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        self.ops += 1
        inputs, outputs = _tensors((args, kwargs)), _tensors(out)
        floating = [t for t in (*outputs, *inputs) if t.is_floating_point()]
        dtype = dtype_key(floating[0].dtype) if floating else "fp32"
        name = func._overloadpacket.__name__
        mutable = func._schema.is_mutable  # in place or out=: writes tensors that exist
        aliased = func.is_view or not mutable and self._aliases(inputs, outputs)
        for _, size in {storage_key(t) for t in outputs} if not (aliased or mutable) else ():
            self.allocated[str(size)] += size
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            flops = formula(*args, **kwargs, out_val=out)
            if "attention" in name:
                direction = "backward" if "backward" in name else "forward"
                self.attention[f"{dtype}/{direction}/{inputs[0].shape[-2]}"] += flops
            else:
                self.matmul[dtype] += flops
            return
        if name in NO_DATA or aliased:
            return  # no data moves
        moved = sum(_bytes_read(t) for t in inputs) + sum(t.numel() * t.element_size() for t in outputs)
        self.bytes[f"{dtype}/{'heavy' if name in HEAVY else 'light'}"] += moved

    @staticmethod
    def _aliases(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> bool:
        """An op that returns a view without declaring it (_unsafe_view)."""
        held = {storage_key(t)[0] for t in inputs}
        return bool(outputs) and all(storage_key(t)[0] in held for t in outputs)


OPTIMIZER_PROBE_ELEMENTS = 4096


def optimizer_work(spec: OptimizerSpec, sizes: tuple[int, ...]) -> Work:
    """One optimizer step over parameter tensors of `sizes` elements, as a strategy runs it (L1/L2,
    the global gradient norm and clipping, the update, zero_grad): counted on a real step of one
    probe tensor, ops per tensor (foreach=False: per-tensor kernels), bytes moved per element, and
    its tensor-sized temporaries (Adam's square root, ...) at each tensor's size; smaller allocations
    (norms, scalars) as they are, per tensor."""
    probe, n = _probe_step(spec), OPTIMIZER_PROBE_ELEMENTS
    allocated: dict[str, float] = {}
    for size in sizes:
        for key, total in probe.allocated_bytes.items():
            if int(key) >= n:  # at least one byte per element: a temporary shaped as the tensor
                scaled = str(int(key) * size // n)
                allocated[scaled] = allocated.get(scaled, 0.0) + total * size / n
            else:
                allocated[key] = allocated.get(key, 0.0) + total
    return Work(elementwise_bytes={k: v * sum(sizes) / n for k, v in probe.elementwise_bytes.items()},
                ops=probe.ops * len(sizes), allocated_bytes=allocated)


@cache
def _probe_step(spec: OptimizerSpec) -> Work:
    from launcher.optim import optimizer_factory
    from strategies.grads import add_l1_l2_, clip_grad_norm_

    param = torch.nn.Parameter(torch.zeros(OPTIMIZER_PROBE_ELEMENTS))
    optimizer = optimizer_factory(spec)([param])
    counter = WorkCounter({})
    for counted in (False, True):  # the first step creates the state; the second is every later one
        param.grad = torch.ones_like(param)
        with counter if counted else nullcontext():
            add_l1_l2_([param], spec.l1, spec.l2)
            clip_grad_norm_([param], spec.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return counter.work
