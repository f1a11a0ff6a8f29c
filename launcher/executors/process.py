"""Run an executor's process tree (torchrun, `accelerate launch`) and watch it until it ends.

The command runs in a fork of the launcher (launcher/executors/forked.py), in its own session so
that Ctrl-C and failures tear down all of it. While it runs, the launcher watches the ranks'
heartbeats (launcher/heartbeat.py): a hung job is diagnosed (which rank is stuck or stopped, where)
and torn down before the process group's own timeout would blame the waiting ranks; and a SIGTERM
the launcher received is relayed to each rank once it can take it (launcher/interrupts.py). When a
rank fails, its exception (written by the worker's @record into the agent's log dir) comes back as
a rank -> error map, with where each rank's full output is (launcher/executors/failures.py).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from launcher.errors import LaunchError
from launcher.executors.failures import Failure, RestartNotices, newest_attempt, read_failures, where_logs_are
from launcher.executors.forked import ForkedCommand
from launcher.executors.request import LaunchRequest
from launcher.heartbeat import HangWatch, diagnose, frozen_ranks, hang_report, read_heartbeats
from launcher.interrupts import LAUNCH_SIGNALS
from launcher.procs import adopt_orphans, kill_launch, launch_token, stop_tree, worker_pids

POLL_S = 0.5


def run_process_tree(request: LaunchRequest) -> None:
    """Start request.argv, wait for it, and raise LaunchError naming the failing ranks (or the stuck one)."""
    started = time.time()
    request.write_generated()
    heartbeats = Path(request.heartbeat_dir)
    _clear_heartbeats(heartbeats)
    token = launch_token()  # in our environment, so the agent and every rank inherit it
    adopted = adopt_orphans(True)  # a rank whose agent died stays below us, where the cleanup looks
    proc: ForkedCommand | None = None
    try:
        LAUNCH_SIGNALS.raise_if_signalled()  # the last moment a signal stops the launch before it starts anything
        relayed: set[int] = set()
        LAUNCH_SIGNALS.relay = lambda: _relay_preemption(token, heartbeats, relayed)  # from here SIGTERM goes to ranks
        proc = ForkedCommand(request.argv, request.env)  # = the printed command, minus a Python start and torch import
        code = _wait(proc, request, started)
    except KeyboardInterrupt:
        if proc is not None:
            stop_tree(proc, token)
        raise
    finally:
        kill_launch(token, os.getpid())
        if adopted:
            adopt_orphans(False)
    if code != 0:
        attempt = newest_attempt(Path(request.log_dir), started)
        failures = read_failures(attempt) if attempt else []
        if _timed_out(failures) and frozen_ranks(beats := read_heartbeats(heartbeats)):
            # the process group's timeout fired before the watch decided: blame the rank that stopped, not its peers
            raise LaunchError(f"the job hung: a collective timed out after {request.hang_timeout_s:g} s"
                              " (training.collective_timeout_s); stopped every process", diagnose(beats),
                              where_logs_are(attempt, []))
        raise LaunchError(f"the job failed ({request.executor} exit code {code})",
                          {failure.rank: failure.text for failure in failures}, where_logs_are(attempt, failures))


def _wait(proc: ForkedCommand, request: LaunchRequest, started: float) -> int:
    heartbeats = Path(request.heartbeat_dir)
    watch = HangWatch(heartbeats, request.world_size, request.hang_timeout_s)
    restarts = RestartNotices(Path(request.log_dir), started)
    while (code := proc.poll()) is None:
        time.sleep(POLL_S)
        LAUNCH_SIGNALS.raise_if_signalled()  # a Ctrl-C whose KeyboardInterrupt a finalizer swallowed
        restarts.poll()
        if LAUNCH_SIGNALS.terminated and LAUNCH_SIGNALS.relay is not None:
            LAUNCH_SIGNALS.relay()  # ranks that started (or restarted) since the signal
        if watch.stalled():
            report = hang_report(heartbeats)  # before the stop: the ranks still answer for their Flight Recorders
            stop_tree(proc, launch_token(), grace_s=2.0)
            raise LaunchError(
                f"the job hung: a rank waited {watch.watch_s:g} s for its peers, or none progressed for"
                f" {request.hang_timeout_s:g} s (training.collective_timeout_s {request.hang_timeout_s:g} s);"
                " stopped every process", report, where_logs_are(newest_attempt(Path(request.log_dir), started), []))
    return code


def _clear_heartbeats(directory: Path) -> None:
    """Beats from an earlier launch of this run would look like a stalled job."""
    for old in directory.glob("rank*.json"):
        old.unlink(missing_ok=True)


def _relay_preemption(token: str, heartbeats: Path, relayed: set[int]) -> None:
    """SIGTERM to every rank of this launch that has installed its preemption flag (it beats: the flag
    comes first, launcher/worker.py) and has not had it yet. A rank still starting gets it at a later
    poll; the ranks of a restarted group are new processes and get it too. Each then checkpoints at
    its next step boundary and exits. Runs in the SIGTERM handler too, so it only reads files."""
    beating = {beat.get("pid") for beat in read_heartbeats(heartbeats).values()}
    for pid in worker_pids(token, root=os.getpid()).values():
        if pid in beating and pid not in relayed:
            relayed.add(pid)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def _timed_out(failures: list[Failure]) -> bool:
    return any("timed out" in failure.text.lower() or "timeout" in failure.text.lower() for failure in failures)
