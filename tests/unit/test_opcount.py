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
    assert optimizer_work(sgd, 10**6, 1).elementwise_bytes["fp32/light"] == pytest.approx(16e6, rel=1e-3)
    adam = OptimizerSpec(name="adam", lr=0.1)
    one, three = optimizer_work(adam, 10**6, 1), optimizer_work(adam, 2 * 10**6, 3)
    assert three.ops == 3 * one.ops > 0
    assert three.elementwise_bytes == {key: 2 * size for key, size in one.elementwise_bytes.items()}
    assert one.elementwise_bytes["fp32/heavy"] > 0  # Adam's square root
