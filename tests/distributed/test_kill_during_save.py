"""SIGKILL of a rank at random moments of a checkpoint-every-step 2-rank run: torchrun restarts the
group, which resumes from exactly the newest complete checkpoint and finishes bit-equal to an
uninterrupted run (0 corrupt loads)."""
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

# Saving every step makes saves most of each step's time, so random kills land inside them.
SECTIONS = {
    "model": {"target": "launcher.models:mlp", "kwargs": {"in_dim": 8, "hidden": 128, "out_dim": 1, "depth": 3}},
    "optimizer": {"name": "adam", "lr": 0.01, "l2": 1.0e-3},
    "training": {"max_steps": 40, "log_every": 1, "checkpoint_every": 1},
    "checkpoint": {"keep": 2},
    "strategy": {"name": "ddp"},
    "resources": {"procs_per_node": 2, "max_restarts": 1},
}
TRIALS = 5


def test_sigkill_during_saves_never_yields_a_corrupt_load(tmp_path):
    reference = launch_ok(make_spec(tmp_path, "reference", **SECTIONS))
    rng = random.Random(1234)
    hit_a_save = 0
    for trial in range(TRIALS):
        spec = make_spec(tmp_path, f"trial{trial}", **SECTIONS)
        run = run_dir(spec)
        launch = start_launch(spec)
        wait_for_step(run, 2)  # step 1's checkpoint is complete
        time.sleep(rng.uniform(0.0, 0.5))
        old_group = worker_pids(str(run / "spec.json"))
        os.kill(old_group[rng.randint(0, 1)], signal.SIGKILL)
        # Read what the dead group left only once all of it is gone (a surviving rank 0 may still be
        # publishing a save every rank had finished) and before the restarted group loads anything.
        psutil.wait_procs(_processes(old_group.values()), timeout=30)
        checkpoints = run / "checkpoints"
        hit_a_save += any(checkpoints.glob(PARTIAL_PREFIX + "*"))
        newest = find_latest(checkpoints)
        before = read_metrics(run)
        out, err = launch.communicate(timeout=240)
        assert launch.returncode == 0, err[-2000:]
        assert newest is not None
        step = int(newest.name.removeprefix("step_"))
        assert f"resumed from {newest} at step {step}" in out, (trial, out[-2000:])
        assert_resumed(run, before, step)
        assert comparable(run) == comparable(reference), f"trial {trial} resumed from {newest}"
        assert params_equal(final_params(run), final_params(reference))
    print(f"{hit_a_save} of {TRIALS} kills landed inside a save")
    assert hit_a_save >= 1, "no kill landed inside a save; the test did not test anything"


def _processes(pids) -> list[psutil.Process]:
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return found
