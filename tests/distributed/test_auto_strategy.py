"""`strategy: auto` with a memory budget that DDP's predicted peak exceeds: the launcher picks a sharded
plan, the ranks run that plan (not one of their own), and the memory they measure stays within it.

The budget is compared with the estimate, which counts what training adds to a rank (model state,
activations, buffers), not the process's own torch/gloo/Python footprint (~0.3 GiB of RSS here). So
the measured side is each rank's peak RSS minus its RSS just before the model was built, which also
holds what the estimate leaves out (the first step's lazy allocations, allocator slack): a stricter
measure than the one auto plans with. The model is sized so that DDP would measure far over the budget
(~260 vs 175 MiB here) and the chosen plan under it (ZeRO-2: ~153 MiB)."""
from __future__ import annotations

import json

import pytest

from launcher.metrics import read_metrics
from launcher.session import prepare
from tests.helpers import launch_ok, make_spec

pytestmark = pytest.mark.distributed

BUDGET = 175 * 2**20
MLP = {"target": "launcher.models:mlp", "kwargs": {"in_dim": 8, "hidden": 1536, "out_dim": 1, "depth": 6}}


def test_auto_picks_a_sharded_plan_that_runs_within_the_budget_ddp_exceeds(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no machine profile: the documented fallback order
    spec = make_spec(tmp_path, model=MLP, optimizer={"name": "adam", "lr": 1e-3},
                     training={"max_steps": 2, "log_every": 1}, checkpoint={"final": False},
                     resources={"procs_per_node": 2, "memory_per_rank": BUDGET})
    ddp = prepare(str(spec), ["strategy.name=ddp"]).estimate
    assert not isinstance(ddp, str) and ddp.predicted_peak_bytes_per_rank > BUDGET  # the premise

    run = launch_ok(spec)
    plan = json.loads((run / "plan.json").read_text())
    assert plan["strategy"] == "zero" and plan["zero_stage"] in (2, 3), plan["inferred"][0]
    assert json.loads((run / "spec.json").read_text())["strategy"]["name"] == "zero"
    # the ranks ran it: rank 0 holds half of Adam's two moments, not all of them
    full_adam = 8 * ddp.total_params
    assert read_metrics(run)[-1]["mem_optim_bytes"] <= 0.51 * full_adam
    summary = json.loads((run / "summary.json").read_text())
    grown = [peak - before for peak, before in zip(summary["peak_rss_bytes_by_rank"],
                                                  summary["rss_before_model_bytes_by_rank"])]
    assert len(grown) == 2 and all(0 < g <= BUDGET for g in grown), [g / 2**20 for g in grown]
