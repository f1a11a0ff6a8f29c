"""Process hygiene: stop a launched process tree and make sure nothing of a run outlives it.

torch's elastic agent starts every worker in its own session, so killing the agent's process group
does not reach them. Every process of a run carries the run's spec path on its command line; that
marker finds stragglers without tracking PIDs across restarts.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Protocol


class Started(Protocol):
    """A started process tree's leader: subprocess.Popen, or the launcher's ForkedCommand."""

    pid: int

    def wait(self, timeout: float | None = None) -> int: ...


def processes_with_marker(marker: str) -> list[int]:
    """PIDs (other than ours) whose command line contains `marker` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(int(entry.name))
    return found


def worker_pids(marker: str) -> dict[int, int]:
    """global rank -> PID of the run's worker processes (RANK read from each one's environment)."""
    ranks = {}
    for pid in processes_with_marker(marker):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"launcher.worker" not in cmdline or b"torch.distributed.run" in cmdline:
                continue  # the agent's own command line names the worker module too
            env = dict(
                item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item
            )
        except OSError:
            continue
        if b"RANK" in env:
            ranks[int(env[b"RANK"])] = pid
    return ranks


def kill_marked(marker: str) -> list[int]:
    """SIGKILL every process of the run that is still alive; return their PIDs."""
    pids = processes_with_marker(marker)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def stop_tree(proc: Started, marker: str, grace_s: float = 8.0) -> None:
    """SIGTERM the launched group (the agent forwards it to workers), then SIGKILL what is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    deadline = time.monotonic() + 1.0
    while processes_with_marker(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    kill_marked(marker)
