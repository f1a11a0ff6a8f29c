"""Faults injected from outside by PID: SIGKILL of a rank, SIGTERM, Ctrl-C, a hung rank, NaN steps.

Every recovery is held to the uninterrupted run: same metrics and parameters, bit for bit.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.guards import VOTE_PERIOD_S
from launcher.metrics import read_metrics
from launcher.procs import processes_with_marker, worker_pids
from tests.faults import SLOW, kill_random_rank_trial, reference_run
from tests.helpers import (
    REPO,
    comparable,
    final_params,
    launch_ok,
    launch_resumed,
    make_spec,
    meshyard,
    params_equal,
    run_dir,
    start_launch,
    wait_for_step,
)
from tests.tracker_readers import read_mlflow

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every recovery is compared with."""
    return reference_run(tmp_path_factory.mktemp("reference"))


def assert_same_as_reference(run: Path, spec: Path, reference) -> None:
    metrics, params = reference
    assert [m["step"] for m in comparable(run)] == list(range(1, 21))
    assert comparable(run) == metrics
    assert params_equal(final_params(run), params)


def test_a_restart_resumes_from_the_newest_checkpoint_even_with_resume_never(tmp_path, reference):
    """`checkpoint.resume: never` governs the launch's first attempt only: after a rank is killed the
    restarted group continues from the newest checkpoint this launch wrote, not from step 0."""
    spec = make_spec(tmp_path, "never", **SLOW, checkpoint={"resume": "never"})
    run = run_dir(spec)
    launch = start_launch(spec)
    seen = wait_for_step(run, 9)  # step 8's checkpoint is published before step 9 is logged
    os.kill(worker_pids(str(run / "spec.json"))[1], signal.SIGKILL)
    out, err = launch.communicate(timeout=240)
    assert launch.returncode == 0, err[-2000:]
    newest = seen // SLOW["training"]["checkpoint_every"] * SLOW["training"]["checkpoint_every"]
    assert f"step_{newest:08d} at step {newest}" in out, out[-2000:]
    assert_same_as_reference(run, spec, reference)


@pytest.mark.parametrize("how,executor", [("segfault", "local"), ("exception", "local"), ("exception", "accelerate")])
def test_a_rank_that_crashes_is_restarted_and_recovers_bit_exact(tmp_path, reference, how, executor):
    """Rank 1 dies at its 72nd item (step 6; 12 items per rank and step), on the first attempt only:
    torchrun (`accelerate launch --max_restarts`) restarts the group, which resumes from step 4."""
    kwargs = {**SLOW["data"]["kwargs"], "crash": how, "crash_rank": 1, "crash_at_call": 72}
    spec = make_spec(tmp_path, how, **{**SLOW, "data": {**SLOW["data"], "kwargs": kwargs}})
    run = run_dir(spec)
    result = meshyard("launch", str(spec), "--executor", executor)
    assert result.returncode == 0, result.stderr[-3000:]
    # the first attempt wrote no checkpoint beyond step 4: this line is the restarted group's
    assert f"resumed from {run / 'checkpoints' / 'step_00000004'} at step 4" in result.stdout
    # the restart is said in one line naming the rank and why (a segfault: where, from faulthandler's dump);
    # the traceback is in the rank's log, not on the console
    why = "killed by signal SIGSEGV" if how == "segfault" else "RuntimeError: injected failure at item call 72"
    restarts = [line for line in result.stderr.splitlines() if line.startswith("restarting every rank")]
    assert len(restarts) == 1 and f"(attempt_1): rank 1 failed: {why}" in restarts[0], result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    rank_log = Path(restarts[0].rsplit("its full output: ", 1)[1])
    assert rank_log == next(run.glob("logs/*/attempt_0/1/stderr.log"))
    assert ("in __getitem__" if how == "segfault" else "Traceback (most recent call last)") in rank_log.read_text()
    assert_same_as_reference(run, spec, reference)


@pytest.mark.parametrize("trial", range(5))
def test_sigkill_of_a_random_rank_recovers_bit_exact(tmp_path, reference, trial):
    result = kill_random_rank_trial(tmp_path, trial, reference)
    assert result["exit_code"] == 0, result["stderr_tail"]
    assert result["restarted"]  # the agent restarted the whole group
    assert result["resumed"] == result["expected_resume"]  # from the newest checkpoint, when there was one
    assert result["bit_exact"]


def test_async_checkpoints_do_not_change_the_run(tmp_path, reference):
    spec = make_spec(tmp_path, "async", **{**SLOW, "checkpoint": {"async": True}})
    run = launch_ok(spec)
    assert_same_as_reference(run, spec, reference)
    assert (run / "checkpoints" / "step_00000020" / "manifest.json").is_file()


@pytest.mark.parametrize("target", ["launcher", "rank 1"])
def test_sigterm_checkpoints_exits_75_and_resumes_bit_exact(tmp_path, reference, target):
    spec = make_spec(tmp_path, "preempted", **SLOW)
    run = run_dir(spec)
    launch = start_launch(spec)
    seen = wait_for_step(run, 6)
    pid = launch.pid if target == "launcher" else worker_pids(str(run / "spec.json"))[1]
    os.kill(pid, signal.SIGTERM)
    out, err = launch.communicate(timeout=120)
    assert launch.returncode == 75, err[-3000:]
    stopped_at = int(err.split("checkpoint written at step ")[1].split(";")[0])
    # docs/failures.md: acted on within about VOTE_PERIOD_S (in steps at the recent rate) plus two
    # steps; + 1 for the step rank 0 may have finished between logging `seen` and the signal.
    step_s = statistics.median(m["step_time_s"] for m in read_metrics(run)[: stopped_at])
    assert seen <= stopped_at <= seen + 1 + math.ceil(VOTE_PERIOD_S / step_s) + 2, (seen, stopped_at, step_s)
    assert (run / "checkpoints" / f"step_{stopped_at:08d}" / "manifest.json").is_file()
    launch_resumed(spec, stopped_at)
    assert_same_as_reference(run, spec, reference)


@pytest.mark.parametrize("delay_s", [0.5, 2.5, 4.5])
def test_sigterm_at_any_moment_of_start_up_exits_75_and_the_same_command_resumes(tmp_path, reference, delay_s):
    """0.5 s: the launcher is still planning (nothing is started); 2.5 s: ranks are importing torch
    (their flag is installed, the relayed signal waits for them); 4.5 s: the first steps."""
    spec = make_spec(tmp_path, "early", **SLOW)
    run = run_dir(spec)
    launch = start_launch(spec)
    time.sleep(delay_s)
    launch.send_signal(signal.SIGTERM)
    _, err = launch.communicate(timeout=120)
    assert launch.returncode == 75, err[-3000:]
    assert processes_with_marker(str(run / "spec.json")) == []
    if "checkpoint written at step " in err:
        launch_resumed(spec, int(err.split("checkpoint written at step ")[1].split(";")[0]))
    else:  # stopped before anything ran, or before the first step boundary: nothing to resume from
        assert "preempted before the job started" in err or "stopped before a checkpoint" in err, err[-3000:]
        fresh = meshyard("launch", str(spec))
        assert fresh.returncode == 0 and "resumed from" not in fresh.stdout, fresh.stderr[-3000:]
    assert_same_as_reference(run, spec, reference)


@pytest.mark.parametrize("delay_s", [0.3, 2.5])
def test_ctrl_c_during_start_up_exits_130_and_leaves_nothing_running(tmp_path, delay_s):
    spec = make_spec(tmp_path, "early_int", **SLOW)
    launch = start_launch(spec)
    time.sleep(delay_s)
    launch.send_signal(signal.SIGINT)
    _, err = launch.communicate(timeout=30)
    assert launch.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert processes_with_marker(str(run_dir(spec) / "spec.json")) == []


def test_ctrl_c_stops_every_process_and_frees_the_port(tmp_path):
    spec = make_spec(tmp_path, "interrupted", **{**SLOW, "training": {**SLOW["training"], "max_steps": 2000}})
    run = run_dir(spec)
    launch = start_launch(spec)
    wait_for_step(run, 3)
    marker = str(run / "spec.json")
    port = int(_environ(worker_pids(marker)[0])["MASTER_PORT"])
    launch.send_signal(signal.SIGINT)
    launch.communicate(timeout=10)
    assert launch.returncode == 130
    assert processes_with_marker(marker) == []
    with socket.socket() as sock:  # the rendezvous port is free again
        sock.bind(("127.0.0.1", port))


def test_hung_rank_is_named_and_torn_down(tmp_path):
    model = {"target": "tests.fixtures.faulty:HangingMLP",
             "kwargs": {"hang_rank": 1, "hang_call": 13, "in_dim": 8, "hidden": 16, "out_dim": 1}}
    spec = make_spec(tmp_path, "hung", **{**SLOW, "model": model})
    timeout_s = 10
    started = time.monotonic()
    result = meshyard("launch", str(spec), "--set", f"training.collective_timeout_s={timeout_s}")
    assert time.monotonic() - started < timeout_s + 30 + 15  # + 15: starting torch and the ranks
    assert result.returncode == 1
    report = result.stderr[result.stderr.index("error: the job hung"):].splitlines()
    assert report[1].startswith("  rank 1 (first to fail): stuck after step 4 (step), in ")
    assert "faulty.py" in report[1] and "in forward" in report[1]
    assert processes_with_marker(str(run_dir(spec) / "spec.json")) == []


STOP_TIMEOUT_S = 10


@pytest.mark.parametrize("trial", range(5))
def test_a_stopped_rank_is_named_within_the_timeout_bound(tmp_path, trial):
    """SIGSTOP of a seeded-random rank (trial 0: during start-up, before the process group exists):
    the report names it, not the peer waiting for it, within the process-group timeout + 30 s."""
    rng = random.Random(trial)
    victim, at_step = rng.randint(0, 1), (0 if trial == 0 else rng.randint(2, 15))
    spec = make_spec(tmp_path, "stopped", **{**SLOW, "training": {**SLOW["training"], "max_steps": 2000}})
    run = run_dir(spec)
    marker = str(run / "spec.json")
    launch = start_launch(spec, f"training.collective_timeout_s={STOP_TIMEOUT_S}")
    if at_step == 0:
        while len(worker_pids(marker)) < 2 or len(list((run / "heartbeats").glob("rank*.json"))) < 2:
            time.sleep(0.02)
    else:
        wait_for_step(run, at_step)
    os.kill(worker_pids(marker)[victim], signal.SIGSTOP)
    stopped = time.monotonic()
    _, err = launch.communicate(timeout=STOP_TIMEOUT_S + 60)
    assert time.monotonic() - stopped < STOP_TIMEOUT_S + 30
    assert launch.returncode == 1
    report = err[err.index("error: the job hung"):].splitlines()
    assert report[1].startswith(f"  rank {victim} (first to fail): stopped responding after step "), report
    assert processes_with_marker(marker) == []


def test_a_disk_full_window_does_not_end_a_healthy_job(tmp_path):
    """2.5 s with not one free byte on the run's filesystem (a real tmpfs, in a private mount
    namespace) in the middle of training: heartbeats and metrics retry, the job ends normally."""
    output = tmp_path / "small_disk"
    steps = 300  # ~15 s after the window: longer than the timeout, so heartbeats that died would be called a hang
    spec = make_spec(tmp_path, "diskfull", **{
        **SLOW, "output": {"dir": str(output)}, "resources": {"procs_per_node": 2, "max_restarts": 0},
        "training": {**SLOW["training"], "max_steps": steps, "checkpoint_every": 0, "collective_timeout_s": 10}})
    result = subprocess.run(["unshare", "-rm", sys.executable, "-m", "tests.fixtures.disk_full", str(spec), str(output),
                             "10", "2.5"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert outcome["returncode"] == 0, outcome["stderr_tail"]
    assert any("heartbeat write failed (" in line for line in outcome["warnings"])  # the window really hit the run
    assert outcome["steps"] == list(range(1, steps + 1))  # no record lost or repeated


def test_nonfinite_stop_names_the_step_and_ends_the_mlflow_run_failed(tmp_path):
    # Item 50 is consumed by step 3 (items [48, 72) with shuffle off and a global batch of 4 x 3 x 2).
    data = {**SLOW["data"], "shuffle": False, "kwargs": {**SLOW["data"]["kwargs"], "nan_items": [50]}}
    spec = make_spec(tmp_path, "nan", **{**SLOW, "data": data, "resources": {"procs_per_node": 2},
                                         "training": {**SLOW["training"], "on_nonfinite": "stop"},
                                         "observe": {"trackers": ["mlflow"]}})
    result = meshyard("launch", str(spec))
    assert result.returncode == 1
    assert "NonFiniteError: step 3: the loss or gradient norm is not finite" in result.stderr
    assert read_mlflow(run_dir(spec)).status == "FAILED"  # rank 0 died with it RUNNING; the launcher ended it


def test_two_jobs_at_the_same_time_both_succeed(tmp_path):
    specs = [make_spec(tmp_path, f"twin{i}", **SLOW) for i in range(2)]
    launches = [start_launch(spec) for spec in specs]
    for launch in launches:
        _, err = launch.communicate(timeout=240)
        assert launch.returncode == 0, err[-2000:]
    assert comparable(run_dir(specs[0])) == comparable(run_dir(specs[1]))


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)
