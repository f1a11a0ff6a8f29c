"""Local executor: torch's elastic agent (torchrun) on this machine, standalone rendezvous on a free port.

The agent runs as a child process in its own session so that Ctrl-C and failures tear down the whole
tree. While it runs, the launcher watches the ranks' heartbeats: a job in which no rank progresses
for `training.collective_timeout_s` is diagnosed (which rank is stuck, where) and torn down. When a
rank fails, its exception (written by the worker's @record into the agent's log dir) comes back as a
rank -> error map.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from launcher.errors import LaunchError
from launcher.executors.request import LaunchRequest
from launcher.heartbeat import HEARTBEAT_DIR, HangWatch, diagnose, read_heartbeats
from launcher.plan import Plan
from launcher.procs import kill_marked, stop_tree, worker_pids

TRACE_LINES = 4
POLL_S = 0.5


class LocalExecutor:
    name = "local"

    def dry_run(self, plan: Plan, spec_path: Path, max_restarts: int, hang_timeout_s: float) -> LaunchRequest:
        run_dir = spec_path.parent
        argv = (
            sys.executable, "-m", "torch.distributed.run",
            "--standalone", f"--nnodes={plan.nodes}", f"--nproc-per-node={plan.procs_per_node}",
            f"--max-restarts={max_restarts}", "--monitor-interval=0.5",
            f"--log-dir={run_dir / 'logs'}",
            "-m", "launcher.worker", str(spec_path),
        )
        # torchrun would set 1 thread per rank with a warning; say it explicitly instead.
        threads = max(1, (os.cpu_count() or 1) // plan.procs_per_node)
        env = {"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        files = {str(spec_path): "resolved job spec (JSON), read by every rank"}
        return LaunchRequest(argv=argv, env=env, files=files, marker=str(spec_path), log_dir=str(run_dir / "logs"),
                             heartbeat_dir=str(run_dir / HEARTBEAT_DIR), world_size=plan.world_size,
                             hang_timeout_s=hang_timeout_s)

    def run(self, request: LaunchRequest) -> None:
        started = time.time()
        _clear_heartbeats(Path(request.heartbeat_dir))
        proc = subprocess.Popen(request.argv, env={**os.environ, **request.env}, start_new_session=True)
        previous = signal.signal(signal.SIGTERM, lambda *_: _forward_sigterm(request.marker))
        try:
            code = self._wait(proc, request)
        except KeyboardInterrupt:
            stop_tree(proc, request.marker)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
            kill_marked(request.marker)
        if code != 0:
            failures = collect_failures(Path(request.log_dir), since=started)
            raise LaunchError(f"the job failed (agent exit code {code})", failures)

    def _wait(self, proc: subprocess.Popen, request: LaunchRequest) -> int:
        watch = HangWatch(Path(request.heartbeat_dir), request.world_size, request.hang_timeout_s)
        while (code := proc.poll()) is None:
            time.sleep(POLL_S)
            if watch.stalled():
                report = diagnose(read_heartbeats(Path(request.heartbeat_dir)))
                stop_tree(proc, request.marker, grace_s=2.0)
                raise LaunchError(
                    f"the job hung: no rank made progress for {request.hang_timeout_s:g} s"
                    " (training.collective_timeout_s); stopped every process", report)
        return code


def _clear_heartbeats(directory: Path) -> None:
    """Beats from an earlier launch of this run would look like a stalled job."""
    for old in directory.glob("rank*.json"):
        old.unlink(missing_ok=True)


def _forward_sigterm(marker: str) -> None:
    """Preemption of the launcher: every rank checkpoints at its next step boundary and exits."""
    for pid in worker_pids(marker).values():
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
