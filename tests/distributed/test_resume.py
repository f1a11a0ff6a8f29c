"""A run stopped after step 10 and resumed to step 20 equals an uninterrupted 20-step run, bit for bit."""
from __future__ import annotations

import pytest
import torch

from launcher.metrics import read_metrics
from tests.helpers import comparable, final_params, launch_ok, launch_resumed, make_spec

pytestmark = pytest.mark.distributed

# 96 items = 4 global batches per epoch, so 20 steps cross epoch boundaries (sampler position matters);
# Adam + warmup + cosine decay, so optimizer and scheduler state matter too.
SECTIONS = {
    "data": {"kwargs": {"n": 96, "in_dim": 8, "out_dim": 1}, "micro_batch_size": 4},
    "optimizer": {"name": "adam", "lr": 0.01, "l1": 1.0e-4, "l2": 1.0e-3, "grad_clip": 0.5},
    "schedule": {"warmup_steps": 3, "decay": "cosine"},
    "training": {"max_steps": 20, "grad_accum_steps": 3, "log_every": 1, "checkpoint_every": 5},
    "strategy": {"name": "ddp"},
    "resources": {"procs_per_node": 2},
}


def test_stop_at_10_then_resume_is_bit_equal_to_uninterrupted(tmp_path):
    whole_spec = make_spec(tmp_path, "whole", **SECTIONS)
    whole = launch_ok(whole_spec)

    split_spec = make_spec(tmp_path, "split", **SECTIONS)
    split = launch_ok(split_spec, "training.stop_at_step=10")
    assert [m["step"] for m in read_metrics(split)][-1] == 10
    launch_resumed(split_spec, 10)  # resume: auto picks up step 10

    ours, theirs = comparable(split), comparable(whole)
    assert [m["step"] for m in ours] == list(range(1, 21))
    assert ours == theirs  # exact float equality, every logged value of every step
    a, b = final_params(whole), final_params(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
