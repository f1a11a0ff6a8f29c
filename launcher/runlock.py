"""One launch per run: an exclusive lock on `<run>/.lock`, held for the whole launch.

`meshyard launch` takes it before it checks or writes anything of the run (spec.json, checkpoints,
metrics) and holds it until it returns: through torch elastic's restarts and Ray's. A second launch
of the run exits 2 with one line naming the holder's PID, having written nothing.

The lock is `fcntl.flock` on the file, so the kernel drops it when its holders die, however they
die: a lock file left by a killed launch never blocks the next one. The launcher's fork (torch's
elastic agent) shares it, so a launcher killed outright keeps the run locked until its agent has
stopped too (launcher/executors/agent.py: within seconds). The file holds the holder's PID, host and
launch token (JSON; launcher/procs.py finds a launch's processes by that token).

Several nodes of one job share the run directory: each node's launcher locks `.lock.node<R>`.
flock works across machines only where the shared file system supports it (NFS emulates it
with byte-range locks on Linux); on one that does not, nothing stops two nodes' launchers.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from launcher.errors import UserError
from launcher.procs import LAUNCH_TOKEN_ENV, new_launch_token

LOCK_FILE = ".lock"


def lock_file(nodes: int, node_rank: int) -> str:
    return LOCK_FILE if nodes == 1 else f"{LOCK_FILE}.node{node_rank}"


@contextlib.contextmanager
def hold_run(run_dir: Path, name: str = LOCK_FILE) -> Iterator[dict[str, Any]]:
    """Hold the run's lock (creating the run directory); UserError naming the holder if it is taken.

    If this call created the run directory and the launch leaves nothing in it but the lock (a
    check refused the launch), the directories it created are removed again.
    """
    created = _missing(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / name
    fd = _acquire(path)
    outer_token = os.environ.get(LAUNCH_TOKEN_ENV)
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "token": new_launch_token(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield holder
    finally:
        if created and [p.name for p in run_dir.iterdir()] == [name]:
            path.unlink(missing_ok=True)  # still locked: a launch that opened it meanwhile retries (_acquire)
            for directory in reversed(created):
                with contextlib.suppress(OSError):
                    directory.rmdir()
        os.close(fd)
        if outer_token is None:
            os.environ.pop(LAUNCH_TOKEN_ENV, None)
        else:
            os.environ[LAUNCH_TOKEN_ENV] = outer_token


def holders(run_dir: Path) -> list[dict[str, Any]]:
    """What the run's lock files say about their latest holders (whether or not still running)."""
    found = []
    for path in sorted(run_dir.glob(f"{LOCK_FILE}*")):
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(path.read_text())
            if isinstance(record, dict):
                found.append(record)
    return found


def held(run_dir: Path) -> bool:
    """Whether a launch holds one of the run's locks now (`meshyard runs`).

    The probe takes a shared lock and drops it at once. A launch starting in that instant would be
    refused as if another one ran, so the probe is made only where the last holder may still run:
    on another host, or a local PID alive and started before it took the lock (not a reused PID).
    """
    here = socket.gethostname()
    for path in sorted(run_dir.glob(f"{LOCK_FILE}*")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            holder = _read_holder(fd, wait_s=0.0)
            if holder.get("host") == here and not _started_before(holder.get("pid"), holder.get("since")):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    return False


def _started_before(pid: Any, since: Any) -> bool:
    try:
        return psutil.Process(int(pid)).create_time() <= float(since) + 1.0
    except (psutil.Error, TypeError, ValueError):
        return False


def _acquire(path: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            where = "" if holder.get("host") in (None, socket.gethostname()) else f" on {holder['host']}"
            raise UserError(f"{path.parent}: another launch of this run is running"
                            f" (PID {holder.get('pid', '?')}{where}); wait for it to end or stop it") from None
        # The holder we waited for may have removed the file after we opened it: lock the file that is there now.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)


def _read_holder(fd: int, wait_s: float = 1.0) -> dict[str, Any]:
    """The holder writes its record right after taking the lock: give it a moment."""
    deadline = time.monotonic() + wait_s
    while True:
        with contextlib.suppress(ValueError):
            record = json.loads(os.pread(fd, 4096, 0).decode(errors="replace") or "null")
            if isinstance(record, dict):
                return record
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.05)


def _missing(directory: Path) -> list[Path]:
    """The directories `directory.mkdir(parents=True)` would create, outermost first."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    return list(reversed(missing))
