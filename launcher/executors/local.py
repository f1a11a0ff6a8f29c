"""Local executor: torch's elastic agent (torchrun) on this machine, standalone rendezvous on a free port.

The agent runs as a child process in its own session so that Ctrl-C and failures tear down the whole
tree. When a rank fails, its exception (written by the worker's @record into the agent's log dir)
comes back as a rank -> error map.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from launcher.errors import LaunchError
from launcher.executors.request import LaunchRequest
from launcher.plan import Plan
from launcher.procs import kill_marked, stop_tree

TRACE_LINES = 4


class LocalExecutor:
    name = "local"

    def dry_run(self, plan: Plan, spec_path: Path, max_restarts: int) -> LaunchRequest:
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
        return LaunchRequest(argv=argv, env=env, files=files, marker=str(spec_path), log_dir=str(run_dir / "logs"))

    def run(self, request: LaunchRequest) -> None:
        started = time.time()
        proc = subprocess.Popen(request.argv, env={**os.environ, **request.env}, start_new_session=True)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            stop_tree(proc, request.marker)
            raise
        finally:
            kill_marked(request.marker)
        if code != 0:
            failures = collect_failures(Path(request.log_dir), since=started)
            raise LaunchError(f"the job failed (agent exit code {code})", failures)


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
