"""observe.trackers and observe.profile in a real 2-rank launch and its resume: each tracker holds
exactly metrics.jsonl (every step once, in one tracker run across both launches), plus the spec as
hyperparameters, the plan and the summary; the chosen rank leaves a Chrome trace of the chosen steps."""
from __future__ import annotations

import json

import pytest

from launcher.metrics import read_metrics
from launcher.rundir import RunDir
from tests.helpers import launch_ok, launch_resumed, make_spec
from tests.tracker_readers import jsonl_curves, read_mlflow, read_tensorboard, read_wandb

pytestmark = pytest.mark.distributed

SECTIONS = {
    "training": {"max_steps": 6, "log_every": 1, "checkpoint_every": 3},
    "strategy": {"name": "ddp"},
    "resources": {"procs_per_node": 2},
    "observe": {"trackers": ["jsonl", "tensorboard", "mlflow", "wandb"], "profile": {"steps": [2, 3], "ranks": [1]}},
}


def test_trackers_hold_metrics_jsonl_across_a_resume_and_the_profile_holds_its_steps(tmp_path):
    spec = make_spec(tmp_path, "tracked", **SECTIONS)
    run = launch_ok(spec, "training.stop_at_step=3")
    first_runs = json.loads(RunDir(run).tracker_runs.read_text())
    launch_resumed(spec, 3)

    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, 7))
    expected = jsonl_curves(metrics)
    assert json.loads(RunDir(run).tracker_runs.read_text()) == first_runs  # the resume reopened the same runs

    tensorboard = read_tensorboard(run)
    assert tensorboard.scalars.keys() == expected.keys()
    for key, points in expected.items():  # event files keep float32
        assert tensorboard.scalars[key] == [(step, pytest.approx(value, rel=1e-6)) for step, value in points], key
    assert tensorboard.hparams["optimizer.lr"] == 0.05 and tensorboard.hparams["observe.profile.ranks"] == "[1]"
    assert {"plan/text_summary", "summary/text_summary"} <= set(tensorboard.texts)

    mlflow = read_mlflow(run)
    assert mlflow.run_ids == [first_runs["mlflow"]["run_id"]] and mlflow.status == "FINISHED"
    assert mlflow.metrics == expected
    assert mlflow.params["optimizer.lr"] == "0.05"
    assert mlflow.artifacts["plan.json"]["world_size"] == 2 and mlflow.artifacts["summary.json"]["steps"] == 6

    wandb = read_wandb(run)
    assert wandb.run_ids == [first_runs["wandb"]["id"]] * 2  # one offline file per launch, one W&B run
    assert wandb.history == expected
    assert wandb.config["optimizer.lr"] == 0.05 and wandb.config["plan.world_size"] == 2
    assert wandb.summary["steps"] == 6

    trace = RunDir(run).profile_trace(1)
    assert [p.name for p in trace.parent.iterdir()] == [trace.name]  # rank 0 was not listed
    events = json.loads(trace.read_text())["traceEvents"]
    steps = {e["name"] for e in events if e["name"].startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#2", "ProfilerStep#3"}
    assert any("Input Dims" in e.get("args", {}) for e in events)  # record_shapes
    assert any(e["name"] == "[memory]" for e in events)  # profile_memory
