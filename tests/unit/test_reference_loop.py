"""meshyard's `single` strategy against a training loop written here in plain torch.

Every parity test holds the distributed strategies to `single`, so a mistake in the loop they all
share (data order, loss averaging over accumulation, the L1/L2 transform, clipping, the optimizer's
hyperparameters, the LR schedule) would pass all of them. This file re-implements the documented
contract (README "What the numbers mean", launcher/sampler.py's data order) without importing
meshyard's loop, optimizer, schedule, sampler or strategy code, and requires the same per-step
loss, penalty, pre-clip gradient norm and lr, and the same final weights, to 1e-6. Only the user's
components (the `mlp` model and `synthetic_regression` data factories) are shared.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from launcher.data import synthetic_regression
from launcher.metrics import read_metrics
from launcher.models import mlp
from tests.helpers import final_params, make_spec, train_in_process

SEED = 7
MODEL_KWARGS = {"in_dim": 8, "hidden": 16, "out_dim": 1, "depth": 2}
# 52 items: 6, 3 or 2 whole global batches of 8, 16 or 24 per epoch (4 items dropped each epoch),
# so 10 steps cross several epoch boundaries whatever the accumulation.
DATA_KWARGS = {"n": 52, "in_dim": 8, "out_dim": 1}
MICRO_BATCH_SIZE = 8
MAX_STEPS = 10
TOLERANCE = 1e-6
LOGGED = ("loss", "penalty", "grad_norm", "lr")

TORCH_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop,
}


@dataclass(frozen=True)
class Case:
    optimizer: str
    hyper: dict[str, Any]  # the optimizer's own arguments: the spec and torch.optim use the same names
    l1: float
    l2: float
    grad_clip: float | None  # where set, below the natural gradient norm at some step
    warmup_steps: int
    decay: str
    min_lr_ratio: float
    grad_accum_steps: int
    shuffle: bool


CASES = {
    "sgd-plain": Case("sgd", {"lr": 0.05}, l1=0.0, l2=0.0, grad_clip=None,
                      warmup_steps=0, decay="constant", min_lr_ratio=0.0, grad_accum_steps=1, shuffle=False),
    "sgd-nesterov-l1-l2-clip-cosine-floor": Case(
        "sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}, l1=1e-3, l2=1e-3,
        grad_clip=0.3, warmup_steps=3, decay="cosine", min_lr_ratio=0.1, grad_accum_steps=2, shuffle=True),
    "sgd-momentum-l2-warmup-constant": Case(
        "sgd", {"lr": 0.05, "momentum": 0.8}, l1=0.0, l2=5e-3, grad_clip=None,
        warmup_steps=3, decay="constant", min_lr_ratio=0.0, grad_accum_steps=1, shuffle=True),
    "adam-l2-clip-linear": Case(
        "adam", {"lr": 3e-3, "betas": [0.8, 0.99], "eps": 1e-7}, l1=0.0, l2=1e-3, grad_clip=0.3,
        warmup_steps=2, decay="linear", min_lr_ratio=0.0, grad_accum_steps=1, shuffle=True),
    "adamw-l1-cosine-accum3": Case(
        "adamw", {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.05}, l1=1e-3, l2=0.0,
        grad_clip=None, warmup_steps=2, decay="cosine", min_lr_ratio=0.0, grad_accum_steps=3, shuffle=False),
    "rmsprop-l1-l2-clip-linear-floor": Case(
        "rmsprop", {"lr": 1e-3, "alpha": 0.9, "eps": 1e-7, "momentum": 0.5, "weight_decay": 1e-3},
        l1=1e-3, l2=1e-3, grad_clip=0.3, warmup_steps=1, decay="linear", min_lr_ratio=0.2,
        grad_accum_steps=2, shuffle=True),
}


def spec_sections(case: Case) -> dict[str, Any]:
    """The case as make_spec sections; momentum is always written so BASE_SPEC's does not leak in."""
    return {
        "seed": SEED,
        "model": {"target": "launcher.models:mlp", "kwargs": MODEL_KWARGS},
        "data": {"target": "launcher.data:synthetic_regression", "kwargs": DATA_KWARGS,
                 "micro_batch_size": MICRO_BATCH_SIZE, "shuffle": case.shuffle},
        "loss": "mse",
        "optimizer": {"name": case.optimizer, "momentum": 0.0, **case.hyper,
                      "l1": case.l1, "l2": case.l2, "grad_clip": case.grad_clip},
        "schedule": {"warmup_steps": case.warmup_steps, "decay": case.decay, "min_lr_ratio": case.min_lr_ratio},
        "training": {"max_steps": MAX_STEPS, "grad_accum_steps": case.grad_accum_steps, "log_every": 1},
        "strategy": {"name": "single"},
    }


def global_batches(dataset_size: int, global_batch_size: int, shuffle: bool) -> Iterator[torch.Tensor]:
    """Item indices of each optimizer step in turn: every epoch is the dataset in order, or a
    permutation drawn from a generator seeded with seed * 1_000_003 + epoch, cut into whole global
    batches; the tail that does not fill one is dropped."""
    whole_batches = dataset_size // global_batch_size
    for epoch in itertools.count():
        if shuffle:
            order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(SEED * 1_000_003 + epoch))
        else:
            order = torch.arange(dataset_size)
        yield from order[: whole_batches * global_batch_size].split(global_batch_size)


def lr_multiplier(step: int, case: Case) -> float:
    """Optimizer step `step` (0-based): (step+1)/warmup during warmup, then the decay from 1 down
    toward min_lr_ratio, which it would reach at step max_steps."""
    if step < case.warmup_steps:
        return (step + 1) / case.warmup_steps
    if case.decay == "constant":
        return 1.0
    progress = (step - case.warmup_steps) / (MAX_STEPS - case.warmup_steps)
    shape = 1.0 - progress if case.decay == "linear" else (1.0 + math.cos(math.pi * progress)) / 2
    return case.min_lr_ratio + (1.0 - case.min_lr_ratio) * shape


def backward_penalty(parameters: Iterable[nn.Parameter], l1: float, l2: float) -> float:
    """Backpropagate l1*|w|_1 + l2*|w|_2^2 over every parameter, biases included, once per
    optimizer step on top of the accumulated data gradient (not divided by the accumulation);
    return its value."""
    penalty = torch.stack([l1 * w.abs().sum() + l2 * w.pow(2).sum() for w in parameters]).sum()
    penalty.backward()
    return penalty.item()


def reference_run(case: Case) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    """Train the case in plain torch: its per-step records (LOGGED keys) and final weights."""
    torch.manual_seed(SEED)
    model = mlp(**MODEL_KWARGS)
    inputs, targets = synthetic_regression(**DATA_KWARGS).tensors
    optimizer = TORCH_OPTIMIZERS[case.optimizer](model.parameters(), **case.hyper)
    global_batch_size = MICRO_BATCH_SIZE * case.grad_accum_steps
    batches = global_batches(len(inputs), global_batch_size, case.shuffle)
    records = []
    for step in range(MAX_STEPS):
        lr = case.hyper["lr"] * lr_multiplier(step, case)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_losses = []
        for items in next(batches).split(MICRO_BATCH_SIZE):
            loss = F.mse_loss(model(inputs[items]), targets[items])
            (loss / case.grad_accum_steps).backward()
            micro_losses.append(loss.detach())
        penalty = backward_penalty(model.parameters(), case.l1, case.l2)
        max_norm = math.inf if case.grad_clip is None else case.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        records.append({"loss": torch.stack(micro_losses).mean().item(), "penalty": penalty,
                        "grad_norm": grad_norm.item(), "lr": lr})
    return records, {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def max_step_diffs(logged: list[dict[str, Any]], reference: list[dict[str, float]]) -> dict[str, float]:
    """Largest absolute difference over the steps, per LOGGED key."""
    return {key: max(abs(got[key] - want[key]) for got, want in zip(logged, reference, strict=True)) for key in LOGGED}


def max_weight_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys()
    return max((got[name] - want[name]).abs().max().item() for name in want)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_single_matches_a_plain_torch_loop(tmp_path: Path, case: Case) -> None:
    run = train_in_process(make_spec(tmp_path, "reference", **spec_sections(case)))
    logged = read_metrics(run)
    reference, reference_weights = reference_run(case)

    assert [record["step"] for record in logged] == list(range(1, MAX_STEPS + 1))
    diffs = max_step_diffs(logged, reference)
    assert all(diff < TOLERANCE for diff in diffs.values()), diffs
    assert max_weight_diff(final_params(run), reference_weights) < TOLERANCE
    if case.grad_clip is not None:
        assert any(record["grad_norm"] > case.grad_clip for record in logged), "clipping never happened"
