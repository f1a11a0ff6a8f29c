"""Fault injection from outside, by PID, shared by the test suite and benchmarks/fault_recovery.py."""
from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

from launcher.procs import worker_pids
from tests.helpers import (
    comparable,
    final_params,
    launch_ok,
    make_spec,
    params_equal,
    run_dir,
    start_launch,
    wait_for_step,
)

# ~50 ms of data loading per step per rank, so a test can act between steps.
SLOW: dict[str, Any] = {
    "data": {"target": "tests.fixtures.faulty:SlowDataset", "micro_batch_size": 4,
             "kwargs": {"n": 96, "in_dim": 8, "out_dim": 1, "delay_s": 0.004}},
    "optimizer": {"name": "adam", "lr": 0.01, "l1": 1.0e-4, "l2": 1.0e-3, "grad_clip": 0.5},
    "schedule": {"warmup_steps": 3, "decay": "cosine"},
    "training": {"max_steps": 20, "grad_accum_steps": 3, "log_every": 1, "checkpoint_every": 4},
    "strategy": {"name": "ddp"},
    "resources": {"procs_per_node": 2, "max_restarts": 1},
}
CHECKPOINT_EVERY = SLOW["training"]["checkpoint_every"]


def reference_run(tmp: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Metrics and final parameters of the uninterrupted SLOW run every recovery is compared with."""
    spec = make_spec(tmp, "reference", **SLOW)
    run = launch_ok(spec)
    return comparable(run), final_params(run)


def kill_random_rank_trial(tmp: Path, seed: int, reference: tuple[list[dict], dict]) -> dict[str, Any]:
    """SIGKILL a seeded-random rank at a seeded-random step of a SLOW run; report how it recovered."""
    rng = random.Random(seed)
    kill_step, victim = rng.randint(2, 17), rng.randint(0, 1)
    spec = make_spec(tmp, f"killed{seed}", **SLOW)
    run = run_dir(spec)
    started = time.monotonic()
    launch = start_launch(spec)
    seen = wait_for_step(run, kill_step)
    os.kill(worker_pids(str(run / "spec.json"))[victim], signal.SIGKILL)
    out, err = launch.communicate(timeout=240)
    metrics, params = reference
    return {
        "seed": seed, "kill_step": seen, "victim_rank": victim, "exit_code": launch.returncode,
        "restarted": bool(list(run.glob("logs/*/attempt_1"))),
        # step 4's checkpoint was complete before step 5 was logged
        "resumed": "resumed from" in out, "expected_resume": seen > CHECKPOINT_EVERY,
        "bit_exact": comparable(run) == metrics and params_equal(final_params(run), params),
        "wall_s": time.monotonic() - started, "stderr_tail": err[-2000:],
    }
