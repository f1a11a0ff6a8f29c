"""Run an executor's process tree (torchrun, `accelerate launch`) and watch it until it ends.

The command runs in a fork of the launcher (launcher/executors/forked.py), in its own session so that Ctrl-C and failures tear down all of it. While it runs,
the launcher watches the ranks' heartbeats: a job in which no rank progresses for
`training.collective_timeout_s` is diagnosed (which rank is stuck, where) and torn down. When a
rank fails, its exception (written by the worker's @record into the agent's log dir) comes back as a
rank -> error map.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from launcher.errors import LaunchError
from launcher.executors.forked import ForkedCommand
from launcher.executors.request import LaunchRequest
from launcher.heartbeat import HangWatch, diagnose, read_heartbeats
from launcher.procs import adopt_orphans, kill_launch, launch_token, stop_tree, worker_pids

TRACE_LINES = 4
POLL_S = 0.5


def run_process_tree(request: LaunchRequest) -> None:
    """Start request.argv, wait for it, and raise LaunchError naming the failing ranks."""
    started = time.time()
    request.write_generated()
    _clear_heartbeats(Path(request.heartbeat_dir))
    token = launch_token()  # in our environment, so the agent and every rank inherit it
    adopted = adopt_orphans(True)  # a rank whose agent died stays below us, where the cleanup looks
    proc = ForkedCommand(request.argv, request.env)  # = the printed command, minus a Python start and torch import
    previous = signal.signal(signal.SIGTERM, lambda *_: _forward_sigterm(token))
    try:
        code = _wait(proc, request)
    except KeyboardInterrupt:
        stop_tree(proc, token)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        kill_launch(token, os.getpid())
        if adopted:
            adopt_orphans(False)
    if code != 0:
        failures = collect_failures(Path(request.log_dir), since=started)
        raise LaunchError(f"the job failed ({request.executor} exit code {code})", failures)


def _wait(proc: ForkedCommand, request: LaunchRequest) -> int:
    watch = HangWatch(Path(request.heartbeat_dir), request.world_size, request.hang_timeout_s)
    while (code := proc.poll()) is None:
        time.sleep(POLL_S)
        if watch.stalled():
            report = diagnose(read_heartbeats(Path(request.heartbeat_dir)))
            stop_tree(proc, launch_token(), grace_s=2.0)
            raise LaunchError(
                f"the job hung: no rank made progress for {request.hang_timeout_s:g} s"
                " (training.collective_timeout_s); stopped every process", report)
    return code


def _clear_heartbeats(directory: Path) -> None:
    """Beats from an earlier launch of this run would look like a stalled job."""
    for old in directory.glob("rank*.json"):
        old.unlink(missing_ok=True)


def _forward_sigterm(token: str) -> None:
    """Preemption of the launcher: every rank checkpoints at its next step boundary and exits."""
    for pid in worker_pids(token, root=os.getpid()).values():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def collect_failures(log_dir: Path, since: float) -> dict[int, str]:
    """rank -> 'ExcType: message' plus the last traceback lines, from the agent's error files.

    Ordered by failure time: the first entry is the root cause, later ones are usually ranks that
    lost their peer ("Connection closed by peer").
    """
    found: list[tuple[float, int, str]] = []
    for error_file in log_dir.glob("*/attempt_*/*/error.json"):
        when = error_file.stat().st_mtime  # finer than the file's own whole-second timestamp
        if when < since:
            continue
        try:
            payload = json.loads(error_file.read_text())["message"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(payload, dict):
            message = str(payload.get("message", "")).strip()
            stack = str(payload.get("extraInfo", {}).get("py_callstack", "")).strip().splitlines()
        else:
            message, stack = str(payload), []
        tail = [line for line in stack[-TRACE_LINES - 1 : -1] if line.strip()]
        headline = message.splitlines()[-1] if message else "?"
        found.append((when, int(error_file.parent.name), "\n".join([headline] + tail)))
    return {rank: text for _, rank, text in sorted(found)}
