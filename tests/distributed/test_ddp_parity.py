"""N-rank DDP training == 1-process training on the same global batch (fp32, fixed seed)."""
from __future__ import annotations

import pytest

from tests.helpers import assert_runs_match, curve, launch_ok, make_spec, train_in_process

pytestmark = pytest.mark.distributed
TOL = 1e-5

# The dataset is exactly one global batch, so every step sees the same set (in a different
# order per epoch) and the loss must fall: equal curves cannot be two flat or noisy lines.
FULL_BATCH_DATA = {"kwargs": {"n": 24, "in_dim": 8, "out_dim": 1}}

OPTIMIZERS = {
    "sgd_momentum": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "l1": 1.0e-3, "l2": 1.0e-3, "grad_clip": 1.0},
    "adam": {"name": "adam", "lr": 0.01, "l1": 1.0e-4, "l2": 1.0e-3, "grad_clip": 1.0},
}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_two_ranks_with_accumulation_match_one_process(tmp_path, optimizer):
    opt = OPTIMIZERS[optimizer]
    reference = make_spec(tmp_path, "reference", optimizer=opt, data=FULL_BATCH_DATA)
    ref_run = train_in_process(reference)  # 1 process, micro-batch 24, no accumulation

    ddp = make_spec(tmp_path, "ddp", optimizer=opt, strategy={"name": "ddp"},
                    data={**FULL_BATCH_DATA, "micro_batch_size": 4}, training={"grad_accum_steps": 3},
                    resources={"procs_per_node": 2})
    ddp_run = launch_ok(ddp)  # 2 ranks x micro-batch 4 x accumulation 3 = 24

    assert len(curve(ddp_run)) == 10
    assert_runs_match(ref_run, ddp_run, TOL)
    ref_loss = curve(ref_run)
    assert all(b < a for a, b in zip(ref_loss, ref_loss[1:]))


def test_accumulation_matches_one_big_batch(tmp_path):
    big = train_in_process(make_spec(tmp_path, "big", data=FULL_BATCH_DATA))  # one batch of 24: the loss falls
    spec = make_spec(tmp_path, "accum", data={**FULL_BATCH_DATA, "micro_batch_size": 4},
                     training={"grad_accum_steps": 6})
    accum = train_in_process(spec)
    assert_runs_match(big, accum, TOL)
