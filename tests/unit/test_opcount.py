"""The work counter behind the predicted step time: bytes of elementwise kernels against hand counts,
matrix-multiply and attention FLOPs against torch's FlopCounterMode, an optimizer step's bytes
against its update rule. No processes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from launcher.opcount import WorkCounter, optimizer_work
from launcher.spec.schema import OptimizerSpec
from launcher.trace import flop_counter

F32 = 4


def counted(fn):
    counter = WorkCounter({})
    with counter:
        fn()
    return counter.work


def test_elementwise_kernels_count_what_they_read_and_write():
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    assert counted(lambda: a + b).elementwise_bytes == {"fp32/light": 3 * 15 * F32}
    assert counted(lambda: a.add_(b)).elementwise_bytes == {"fp32/light": 3 * 15 * F32}  # in place: writes a
    assert counted(lambda: F.gelu(a)).elementwise_bytes == {"fp32/heavy": 2 * 15 * F32}
    assert counted(lambda: a + b[:1].expand(3, 5)).elementwise_bytes == {"fp32/light": (15 + 5 + 15) * F32}
    assert counted(lambda: a.to(torch.bfloat16)).elementwise_bytes == {"bf16/light": 15 * F32 + 15 * 2}
    views = counted(lambda: a.view(15).t().transpose(0, 0))
    assert views.elementwise_bytes == {} and views.ops == 3  # no data moves; each still pays its dispatch


def test_a_traced_forward_and_backward_splits_flops_by_kind_and_counts_gelu_bytes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    batch, width, seq = 2, 8, 16
    mode = FakeTensorMode()
    with mode:
        model = nn.Sequential(nn.Linear(4, width), nn.GELU())
        x = torch.randn(batch, 4)
        q = torch.randn(batch, 2, seq, 4, requires_grad=True)
    flops = flop_counter()
    work_counter = WorkCounter(flops.flop_registry)
    with mode, work_counter, flops:
        out = model(x)
        out.backward(torch.ones_like(out))
        F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    work = work_counter.work
    assert work.flops == flops.get_total_flops() > 0
    assert set(work.attention_flops) == {f"fp32/forward/{seq}", f"fp32/backward/{seq}"}
    assert work.matmul_flops["fp32"] == 2 * 2 * batch * 4 * width  # forward and weight gradient (x needs none)
    activation = batch * width * F32
    assert work.elementwise_bytes["fp32/heavy"] == 2 * activation + 3 * activation  # gelu; gelu_backward


def test_an_optimizer_step_scales_with_elements_and_tensors():
    sgd = OptimizerSpec(name="sgd", lr=0.1)
    # p -= lr * grad reads p and grad and writes p; the gradient norm reads grad once more
    assert optimizer_work(sgd, (10**6,)).elementwise_bytes["fp32/light"] == pytest.approx(16e6, rel=1e-3)
    adam = OptimizerSpec(name="adam", lr=0.1)
    one, three = optimizer_work(adam, (10**6,)), optimizer_work(adam, (10**6, 6 * 10**5, 4 * 10**5))
    assert three.ops == 3 * one.ops > 0
    assert three.elementwise_bytes == pytest.approx({key: 2 * size for key, size in one.elementwise_bytes.items()})
    assert one.elementwise_bytes["fp32/heavy"] > 0  # Adam's square root
    # Adam's temporaries (the square root, its division) are as large as the tensor; the norms' are scalars
    assert one.allocated_bytes[str(4 * 10**6)] == 2 * 4 * 10**6
    assert three.allocated_bytes[str(4 * 6 * 10**5)] == 2 * 4 * 6 * 10**5
    assert 0 < sum(v for k, v in three.allocated_bytes.items() if int(k) < 4096) < 100 * 3


def test_allocations_are_counted_by_size_and_views_and_in_place_ops_allocate_nothing():
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    assert counted(lambda: a + b).allocated_bytes == {str(15 * F32): 15 * F32}
    assert counted(lambda: (a + b, a * b, a.sum())).allocated_bytes == {str(15 * F32): 2 * 15 * F32, str(F32): F32}
    assert counted(lambda: (a.add_(b), a.view(15), a.t(), torch.add(a, b, out=b))).allocated_bytes == {}
    assert counted(lambda: a.to(torch.bfloat16)).allocated_bytes == {str(15 * 2): 15 * 2}
    work = counted(lambda: torch.mm(torch.empty(64, 32), torch.empty(32, 1024)))
    assert work.allocated_bytes == {str(64 * 32 * F32): 64 * 32 * F32, str(32 * 1024 * F32): 32 * 1024 * F32,
                                    str(64 * 1024 * F32): 64 * 1024 * F32}
    # what glibc would map anew: the allocations at or above its threshold
    assert work.first_touch_bytes(64 * 1024 * F32) == 64 * 1024 * F32
    assert work.first_touch_bytes(64 * 32 * F32) == (64 * 32 + 32 * 1024 + 64 * 1024) * F32
    assert work.first_touch_bytes(None) == 0
