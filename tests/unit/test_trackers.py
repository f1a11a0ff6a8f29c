"""Trackers in one process, no training: what a resume after a launch that died past its checkpoint
leaves in each, and the plan errors for a tracker that is not installed or a profile out of range."""
from __future__ import annotations

import sys

import pytest

from launcher.cli import main
from launcher.metrics import MetricsLogger, read_metrics
from launcher.plan import make_plan
from launcher.spec import load_spec
from launcher.trackers import open_trackers
from tests.helpers import make_spec, run_dir
from tests.tracker_readers import read_mlflow, read_tensorboard, read_wandb


def _launch(spec_path, start_step: int, losses: dict[int, float], finish: bool) -> None:
    """What the trainer does with trackers, on records with these losses; `finish=False`: the launch dies."""
    spec = load_spec(spec_path)
    trackers = open_trackers(spec, make_plan(spec), run_dir(spec_path), start_step)
    logger = MetricsLogger(run_dir(spec_path), True, start_step, 5, trackers)
    for step, loss in losses.items():
        logger.log({"step": step, "loss": loss, "lr": 0.1, "grad_norm": 1.0, "skipped": False, "samples_per_s": 10.0,
                    "step_time_s": 0.1})
    if finish:
        logger.finish_trackers({"steps": max(losses), "preempted": False})
    else:  # a killed rank leaves W&B's run unfinished: end it as the dying process's exit would
        trackers[-1].run.finish(exit_code=1)


def test_a_resume_after_a_death_past_the_checkpoint_shows_each_step_once(tmp_path):
    spec = make_spec(tmp_path, observe={"trackers": ["tensorboard", "mlflow", "wandb"]})
    _launch(spec, 0, {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}, finish=False)  # died after step 4, checkpoint at 2
    _launch(spec, 2, {3: 30.0, 4: 40.0, 5: 50.0}, finish=True)
    run = run_dir(spec)

    retrained = [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]
    assert [(m["step"], m["loss"]) for m in read_metrics(run)] == retrained
    assert read_tensorboard(run).scalars["loss"] == retrained  # purge_step hides the dead launch's 3 and 4
    first_values = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0)]  # points cannot be deleted: the first stay
    mlflow = read_mlflow(run)
    assert len(mlflow.run_ids) == 1 and mlflow.metrics["loss"] == first_values
    assert mlflow.metrics["skipped"] == [(step, 0.0) for step, _ in first_values]  # true/false as 1/0
    wandb = read_wandb(run)
    assert len(set(wandb.run_ids)) == 1 and wandb.history["loss"] == first_values


PROFILE = {"trackers": [], "profile": {"steps": [2, 3], "ranks": [0]}}
CASES = [
    ("tracker not installed", {"trackers": ["wandb"]}, "wandb",
     "observe.trackers: wandb needs wandb, not installed; pip install 'meshyard[wandb]'"),
    ("mlflow's sqlite store not installed", {"trackers": ["mlflow"]}, "sqlalchemy",
     "observe.trackers: mlflow needs sqlalchemy, not installed; pip install 'meshyard[mlflow]'"),
    ("unknown tracker", {"trackers": ["neptune"]}, None,
     "observe.trackers.0: Input should be 'jsonl', 'tensorboard', 'mlflow' or 'wandb'"),
    ("tracker twice", {"trackers": ["mlflow", "mlflow"]}, None, "observe.trackers: ['mlflow', 'mlflow']: name each"),
    ("profile steps reversed", {"profile": {"steps": [3, 2]}}, None,
     "observe.profile: steps: [3, 2] must be [a, b] with 1 <= a <= b"),
    ("profile past the end", {"profile": {"steps": [9, 11]}}, None,
     "observe.profile.steps: step 11 is past training.max_steps=10"),
    ("profile rank outside the world", {"profile": {"steps": [1, 2], "ranks": [0, 2]}}, None,
     "observe.profile.ranks: [2] not in the world of 1 rank(s) (0..0)"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_observe_section(tmp_path, capsys, monkeypatch, case):
    _, observe, missing_module, expected = case
    if missing_module is not None:
        monkeypatch.setitem(sys.modules, missing_module, None)  # Python's own "not importable" marker
    code = main(["plan", str(make_spec(tmp_path, observe=observe))])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and expected in err, err


def test_the_plan_says_where_trackers_write_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    plan = make_plan(load_spec(make_spec(tmp_path, observe={"trackers": ["mlflow", "wandb"]})))
    assert {"observe.mlflow_tracking_uri = sqlite:///<run>/mlflow.db, artifacts in <run>/mlruns (null)",
            "W&B mode = offline, files in <run>/wandb (WANDB_MODE not set)"} <= set(plan.inferred)
    monkeypatch.setenv("WANDB_MODE", "online")
    told = make_plan(load_spec(make_spec(tmp_path, observe={"trackers": ["mlflow", "wandb"],
                                                           "mlflow_tracking_uri": "http://127.0.0.1:5000"})))
    assert not [line for line in told.inferred if "mlflow" in line or "W&B" in line]
