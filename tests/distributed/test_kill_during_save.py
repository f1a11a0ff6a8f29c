"""SIGKILL at random moments of a checkpoint-every-step run: every resume loads the newest complete
checkpoint and finishes bit-equal to an uninterrupted run (0 corrupt loads)."""
from __future__ import annotations

import random
import subprocess
import sys
import time

import pytest

from launcher.checkpoint import PARTIAL_PREFIX, find_latest
from launcher.metrics import read_metrics
from launcher.session import prepare
from tests.helpers import (
    REPO,
    assert_resumed,
    comparable,
    final_params,
    make_spec,
    params_equal,
    train_in_process,
    wait_for_step,
)

pytestmark = pytest.mark.distributed

# Saving every step makes saves most of each step's time, so random kills land inside them.
SECTIONS = {
    "model": {"target": "launcher.models:mlp", "kwargs": {"in_dim": 8, "hidden": 128, "out_dim": 1, "depth": 3}},
    "optimizer": {"name": "adam", "lr": 0.01, "l2": 1.0e-3},
    "training": {"max_steps": 60, "log_every": 1, "checkpoint_every": 1},
    "checkpoint": {"keep": 2},
}
TRIALS = 10


def test_sigkill_during_saves_never_yields_a_corrupt_load(tmp_path):
    reference_spec = make_spec(tmp_path, "reference", **SECTIONS)
    reference = train_in_process(reference_spec)
    rng = random.Random(1234)
    hit_a_save = 0
    for trial in range(TRIALS):
        spec_file = make_spec(tmp_path, f"trial{trial}", **SECTIONS)
        session = prepare(str(spec_file), [])
        session.write_spec()
        worker = subprocess.Popen([sys.executable, "-m", "launcher.worker", str(session.spec_path)], cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_step(session.run_dir, 1)
        time.sleep(rng.uniform(0.0, 0.5))
        worker.kill()
        worker.wait()
        checkpoints = session.run_dir / "checkpoints"
        hit_a_save += any(checkpoints.glob(PARTIAL_PREFIX + "*"))
        newest = find_latest(checkpoints)
        before = read_metrics(session.run_dir)
        run = train_in_process(spec_file)  # resume: auto
        if newest is not None:  # it resumed from exactly the newest complete checkpoint
            assert_resumed(run, before, int(newest.name.removeprefix("step_")))
        assert comparable(run) == comparable(reference), f"trial {trial} resumed from {newest}"
        assert params_equal(final_params(run), final_params(reference))
    print(f"{hit_a_save} of {TRIALS} kills landed inside a save")
    assert hit_a_save >= 1, "no kill landed inside a save; the test did not test anything"
