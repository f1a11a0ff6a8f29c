"""Trace one micro-batch through the model on fake tensors: what it saves for backward, its FLOPs,
and the tensors that cross layer boundaries. No memory is used and no process is started.

The model comes from the meta device and is moved onto torch's FakeTensorMode (shapes, dtypes and
storages without data), so autocast and every shape rule run as on a real CPU rank. The forward is
cut into segments: before the layer list, each layer, after it (the loss included), so that the
pipeline estimate can sum the segments of each stage.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from launcher.opcount import Work, WorkCounter, storage_key
from strategies.batch import BatchFeed, LossFn, tree_map

if TYPE_CHECKING:
    from torch._subclasses.fake_tensor import FakeTensorMode


class NotTraced(Exception):
    """The model (or its loss) cannot run on fake tensors: it reads values (.item(), numpy, ...)."""


@dataclass(frozen=True)
class Trace:
    """One micro-batch; per-segment tuples are [before the layers, layer 0, ..., layer n-1, after]."""

    saved_bytes: tuple[int, ...]  # bytes of the tensors saved for backward (parameters excluded)
    forward_flops: tuple[int, ...]
    forward_work: tuple[Work, ...]  # each segment's forward kernels (what a checkpointed layer runs again)
    flops: int  # forward + backward
    boundary_bytes: tuple[int, ...]  # bytes of each layer's output (what a pipeline stage sends on)
    input_bytes: tuple[int, ...]  # bytes of each layer's input (what a checkpointed layer keeps for backward)
    tp_bytes: tuple[int, ...]  # payload of tensor-parallel all-reduces (forward and backward)
    tp_linears: tuple[int, ...]  # tensor-parallel layers run (each pays DTensor overhead forward and backward)
    work: Work  # the kernels of forward + backward, for the predicted step time

    @property
    def activation_bytes(self) -> int:
        return sum(self.saved_bytes)


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"


def fake_model(meta_model: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """`meta_model`, in place, with fake CPU tensors instead of meta ones (no data either way)."""
    with mode:
        return meta_model.to_empty(device="cpu")


def narrow_for_tp(model: nn.Module, styles: dict[str, str], degree: int, mode: FakeTensorMode) -> None:
    """Give each tensor-parallel nn.Linear the local shape rank 0 holds (torch.chunk: the first
    chunk is the largest): column-wise splits the outputs (weight dim 0 and bias), row-wise the
    inputs (weight dim 1). Heads follow the width, as in the real run."""
    with mode:
        for name, style in styles.items():
            linear = model.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                continue
            out_f, in_f = linear.out_features, linear.in_features
            if style == "colwise":
                out_f = -(-out_f // degree)
            else:
                in_f = -(-in_f // degree)
            dtype = linear.weight.dtype
            linear.weight = nn.Parameter(torch.empty(out_f, in_f, dtype=dtype))
            if linear.bias is not None and style == "colwise":
                linear.bias = nn.Parameter(torch.empty(out_f, dtype=dtype))
            linear.in_features, linear.out_features = in_f, out_f


def flop_counter() -> Any:
    """torch's FlopCounterMode, taught the CPU kernel of scaled_dot_product_attention (torch counts
    only the CUDA kernels, so on CPU a transformer's attention FLOPs would be missing)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
    })


def _first_tensor_bytes(value: Any) -> int:
    found: list[torch.Tensor] = []
    tree_map(found.append, value)
    return found[0].numel() * found[0].element_size() if found else 0


class _Segments:
    """Which segment the forward is in, and the forward FLOPs and kernel work counted in each."""

    def __init__(self, count: int, total_flops: Callable[[], int], total_work: Callable[[], Work]) -> None:
        self.current, self.flops, self._total, self._mark = 0, [0] * count, total_flops, 0
        self.work, self._total_work, self._work_mark = [Work()] * count, total_work, Work()

    def enter(self, segment: int) -> None:
        total, work = self._total(), self._total_work()
        self.flops[self.current] += total - self._mark
        self.work[self.current] += work - self._work_mark
        self.current, self._mark, self._work_mark = segment, total, work


@contextlib.contextmanager
def _fake_tensor_log_quiet() -> Iterator[None]:
    """FakeTensorMode logs a full traceback for an op whose shapes do not fit (a wrong tp plan) before
    raising; the estimate reports that error on one line instead (NotTraced)."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def trace_micro_batch(model: nn.Module, batch: Any, mode: FakeTensorMode, feed: BatchFeed, loss_fn: LossFn,
                      precision: str, layers: nn.ModuleList | None, tp_styles: dict[str, str]) -> Trace:
    """Forward (with the loss) and backward of `batch` on the fake `model`; NotTraced with the reason."""
    blocks = list(layers) if layers is not None else []
    n = len(blocks)
    counter = flop_counter()
    work = WorkCounter(counter.flop_registry)
    segments = _Segments(n + 2, counter.get_total_flops, lambda: work.work)
    boundary, inputs, tp_bytes, tp_linears = [0] * n, [0] * n, [0] * (n + 2), [0] * (n + 2)
    weights = {storage_key(t)[0] for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, tuple[int, int]] = {}  # storage -> (segment, bytes)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key, size = storage_key(tensor)
        if key not in weights and key not in saved:
            saved[key] = (segments.current, size)
        return tensor

    def on_layer_end(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            boundary[index] = _first_tensor_bytes(output)
            if index == n - 1:
                segments.enter(n + 1)
        return hook

    def on_tp_layer(style: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            # row-wise: the output is all-reduced in forward; column-wise: its input's gradient in backward
            tp_bytes[segments.current] += _first_tensor_bytes(output if style == "rowwise" else args)
            tp_linears[segments.current] += 1
        return hook

    def on_layer_start(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            inputs[index] = _first_tensor_bytes(args) or _first_tensor_bytes(kwargs)
            segments.enter(index + 1)
        return hook

    handles = [block.register_forward_pre_hook(on_layer_start(i), with_kwargs=True) for i, block in enumerate(blocks)]
    handles += [block.register_forward_hook(on_layer_end(i)) for i, block in enumerate(blocks)]
    handles += [model.get_submodule(name).register_forward_hook(on_tp_layer(style))
                for name, style in tp_styles.items()]
    try:
        # the work counter below the flop counter: it sees the ops after their decomposition
        with mode, work, counter, _fake_tensor_log_quiet():
            args, kwargs, target = feed.split(tree_map(mode.from_tensor, batch))
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
                    torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = feed.loss(model(*args, **kwargs), target, loss_fn)
            segments.enter(segments.current)  # close the last segment's forward count
            loss.backward()
    except Exception as exc:  # the user's model: its own error, on one line
        raise NotTraced(one_line(exc)) from None
    finally:
        for handle in handles:
            handle.remove()
    per_segment = [0] * (n + 2)
    for segment, size in saved.values():
        per_segment[segment] += size
    return Trace(saved_bytes=tuple(per_segment), forward_flops=tuple(segments.flops),
                 forward_work=tuple(segments.work), flops=counter.get_total_flops(),
                 boundary_bytes=tuple(boundary), input_bytes=tuple(inputs), tp_bytes=tuple(tp_bytes),
                 tp_linears=tuple(tp_linears), work=work.work)
