"""SIGKILL of a rank at random moments of a checkpoint-every-step 2-rank run, five times in one
launch: after each kill torchrun restarts the group, which resumes from exactly the newest complete
checkpoint the dead group left (0 corrupt loads), and the run finishes bit-equal to an uninterrupted one."""
from __future__ import annotations

import os
import random
import signal
import time

import psutil
import pytest

from launcher.checkpoint import PARTIAL_PREFIX, find_latest
from launcher.metrics import read_metrics
from launcher.procs import worker_pids
from tests.helpers import (
    assert_resumed,
    comparable,
    final_params,
    launch_ok,
    make_spec,
    params_equal,
    run_dir,
    start_launch,
    wait_for_step,
)

pytestmark = pytest.mark.distributed

KILLS = 5
# Saving every step makes saves most of each step's time (~45 ms a step here), so random kills land
# inside them. Each kill costs the run at most ~6 steps (a random moment of up to 0.15 s, then 2 steps
# of the restarted group before the next kill): 50 steps leave room for all five.
SECTIONS = {
    "model": {"target": "launcher.models:mlp", "kwargs": {"in_dim": 8, "hidden": 128, "out_dim": 1, "depth": 3}},
    "optimizer": {"name": "adam", "lr": 0.01, "l2": 1.0e-3},
    "training": {"max_steps": 50, "log_every": 1, "checkpoint_every": 1},
    "checkpoint": {"keep": 2},
    "strategy": {"name": "ddp"},
    "resources": {"procs_per_node": 2, "max_restarts": KILLS},
}


def test_sigkill_during_saves_never_yields_a_corrupt_load(tmp_path):
    reference = launch_ok(make_spec(tmp_path, "reference", **SECTIONS))
    rng = random.Random(1234)
    spec = make_spec(tmp_path, "killed", **SECTIONS)
    run = run_dir(spec)
    checkpoints = run / "checkpoints"
    launch = start_launch(spec)
    kills = []  # (newest complete checkpoint the dead group left, the metrics rows logged by then)
    try:
        wait_for_step(run, 2)  # step 1's checkpoint is complete
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.0, 0.15))
            old_group = worker_pids(str(run / "spec.json"))
            assert len(old_group) == 2, f"the run ended before kill {len(kills) + 1}: raise max_steps"
            os.kill(old_group[rng.randint(0, 1)], signal.SIGKILL)
            # Read what the dead group left only once all of it is gone (a surviving rank 0 may still be
            # publishing a save every rank had finished) and before the restarted group loads anything.
            psutil.wait_procs(_processes(old_group.values()), timeout=30)
            newest = find_latest(checkpoints)
            assert newest is not None
            kills.append((newest, any(checkpoints.glob(PARTIAL_PREFIX + "*")), read_metrics(run)))
            # Rows past newest + 1 can only come from the restarted group (a row means the step before it
            # was saved): once it logged newest + 2 it has resumed and saved a checkpoint of its own.
            wait_for_step(run, _step(newest) + 2)
        out, err = launch.communicate(timeout=240)
    finally:
        if launch.poll() is None:
            launch.kill()
            launch.communicate()
    assert launch.returncode == 0, err[-2000:]
    for newest, _, before in kills:
        assert f"resumed from {newest} at step {_step(newest)}" in out, (newest, out[-3000:])
        assert_resumed(run, before, _step(newest))
    assert len(list(run.glob("logs/*/attempt_*"))) == KILLS + 1  # one restart per kill
    assert comparable(run) == comparable(reference)
    assert params_equal(final_params(run), final_params(reference))
    hit_a_save = sum(inside for _, inside, _ in kills)
    print(f"{hit_a_save} of {KILLS} kills landed inside a save")
    assert hit_a_save >= 1, "no kill landed inside a save; the test did not test anything"


def _step(checkpoint) -> int:
    return int(checkpoint.name.removeprefix("step_"))


def _processes(pids) -> list[psutil.Process]:
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return found
