"""Regularization equals the gradient of its penalty; clipping follows torch's rule; LR schedules."""
from __future__ import annotations

import math

import pytest
import torch

from launcher.optim import WarmupDecay
from launcher.spec.schema import ScheduleSpec
from strategies.grads import add_l1_l2_, clip_grad_norm_


def test_l1_l2_transform_is_the_gradient_of_the_penalty():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    l1, l2 = 0.03, 0.2
    w.grad = torch.zeros_like(w)
    penalty = add_l1_l2_([w], l1, l2)
    expected_grad = torch.autograd.grad(l1 * w.abs().sum() + l2 * w.pow(2).sum(), w)[0]
    assert torch.allclose(w.grad, expected_grad)
    assert penalty.item() == pytest.approx((l1 * w.abs().sum() + l2 * w.pow(2).sum()).item(), rel=1e-6)


def test_parameters_without_gradient_are_left_alone():
    w = torch.nn.Parameter(torch.ones(3))
    assert add_l1_l2_([w], 0.1, 0.1).item() == 0.0 and w.grad is None


def test_clip_matches_torch():
    torch.manual_seed(1)
    ours = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(3)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn(4, 4)
        b.grad = a.grad.clone()
    norm = clip_grad_norm_(ours, 0.5)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(torch.allclose(a.grad, b.grad) for a, b in zip(ours, theirs))
    assert clip_grad_norm_(ours, None).item() == pytest.approx(0.5, rel=1e-4)  # None measures only


@pytest.mark.parametrize("decay,at_end", [("constant", 1.0), ("linear", 0.1), ("cosine", 0.1)])
def test_warmup_then_decay(decay, at_end):
    f = WarmupDecay(ScheduleSpec(warmup_steps=4, decay=decay, min_lr_ratio=0.1), max_steps=104)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(104) == pytest.approx(at_end)
    if decay == "cosine":
        assert f(54) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
