"""Process hygiene: find, signal and stop the processes of one launch, and never anyone else's.

A process belongs to a launch when it carries the launch's random token in its environment
(MESHYARD_LAUNCH_TOKEN, set by `meshyard launch` before anything starts and inherited by torchrun's
ranks, Accelerate's and Ray's processes) AND descends from the launcher (parent PIDs and
environments through psutil; while a launch runs the launcher is a child subreaper, so a rank orphaned by its
agent is re-parented to the launcher and still counts as its descendant). Command lines are never
used: a user's `tail -f runs/x/spec.json` names the run but is not ours. torch's elastic agent
starts every rank in a session of its own, so sessions and process groups do not find them either.

The agent itself runs in a fork of the launcher (launcher/executors/forked.py) that never execs, so
its exec'd environment does not show the token: it is known by its PID (the launcher's child).

Finding processes works wherever psutil reads other processes' environments (Linux; macOS for the
user's own). The kernel helpers below are Linux only (prctl: a child subreaper, parent-death
signals); elsewhere they do nothing, so a rank orphaned by a dead agent is re-parented to init and
no longer found as the launcher's descendant.
"""
from __future__ import annotations

import ctypes
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import Protocol

import psutil

LAUNCH_TOKEN_ENV = "MESHYARD_LAUNCH_TOKEN"
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


class Started(Protocol):
    """A started process tree's leader: subprocess.Popen, or the launcher's ForkedCommand."""

    pid: int

    def wait(self, timeout: float | None = None) -> int: ...


def new_launch_token() -> str:
    """A fresh random token for this launch, put in our environment so that everything started from
    here on inherits it."""
    token = secrets.token_hex(16)
    os.environ[LAUNCH_TOKEN_ENV] = token
    return token


def launch_token() -> str:
    """This launch's token (a fresh one if `meshyard launch` has not set it, e.g. an executor run directly)."""
    return os.environ.get(LAUNCH_TOKEN_ENV) or new_launch_token()


def parents() -> dict[int, int]:
    """pid -> parent pid of every process we can see."""
    found = {}
    for process in psutil.process_iter(["pid", "ppid"]):
        ppid = process.info.get("ppid")
        if ppid is not None:
            found[process.info["pid"]] = ppid
    return found


def descendants(root: int, tree: dict[int, int] | None = None) -> set[int]:
    """Every process below `root` in the process tree (not `root` itself)."""
    tree = parents() if tree is None else tree
    children: dict[int, list[int]] = {}
    for pid, ppid in tree.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def environ(pid: int) -> dict[str, str] | None:
    """A process's environment as it was exec'd (None when unreadable: gone, a zombie, not ours)."""
    try:
        return psutil.Process(pid).environ()
    except (psutil.Error, OSError):
        return None


def launch_processes(launch: str, root: int | None = None) -> list[int]:
    """PIDs (other than ours) that carry the launch's token; with `root`, only descendants of `root`.

    `launch` is a token, or (for tests and tools outside the launcher) a run's spec.json or run
    directory, whose lock files name the token of the launches that held them.
    """
    tokens = set(_tokens(launch))
    if not tokens:
        return []
    tree = parents()
    candidates = descendants(root, tree) if root is not None else set(tree)
    candidates.discard(os.getpid())
    return sorted(pid for pid in candidates if (environ(pid) or {}).get(LAUNCH_TOKEN_ENV) in tokens)


# The name earlier callers (tests) use; the argument is a token or a run's spec path, never a command-line substring.
processes_with_marker = launch_processes


def worker_pids(launch: str, root: int | None = None) -> dict[int, int]:
    """global rank -> PID of the launch's rank processes (RANK read from each one's environment).

    A rank's own children (data loader workers) inherit RANK: the rank is the one whose parent has
    another RANK, or none (the agent).
    """
    pids = launch_processes(launch, root)
    tree = parents()
    ranks = {}
    for pid in pids:
        env = environ(pid) or {}
        if "RANK" not in env or "LOCAL_RANK" not in env:
            continue
        parent_env = environ(tree.get(pid, 0)) or {}
        if parent_env.get("RANK") == env["RANK"]:
            continue
        ranks[int(env["RANK"])] = pid
    return ranks


def kill_launch(token: str, root: int) -> list[int]:
    """SIGKILL every process of the launch below `root` that is still alive; return their PIDs."""
    pids = launch_processes(token, root)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap(pids, wait_s=1.0)
    return pids


def stop_tree(proc: Started, token: str, grace_s: float = 8.0) -> None:
    """SIGTERM the launched group (the agent forwards it to the ranks), then SIGKILL what is left of
    the group and of the launch below us."""
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
    end_launch(token)


def end_launch(token: str, grace_s: float = 1.0) -> None:
    """Give the launch's processes below us that are already on their way out `grace_s` to end, then
    SIGKILL the rest: when this returns, none is left running (those we adopted are reaped too)."""
    seen: set[int] = set()
    deadline = time.monotonic() + grace_s
    while (alive := launch_processes(token, os.getpid())) and time.monotonic() < deadline:
        seen.update(alive)
        _reap(seen)
        time.sleep(0.1)
    kill_launch(token, os.getpid())
    _reap(seen)


def adopt_orphans(on: bool) -> bool:
    """Make this process a child subreaper (Linux >= 3.4): processes orphaned below it are re-parented
    to it instead of init, so they stay its descendants. False where that is not possible."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0)


def die_with_parent(sig: int) -> bool:
    """Ask the kernel to send `sig` to this process when the thread that started it exits."""
    return _prctl(PR_SET_PDEATHSIG, int(sig))


def _prctl(option: int, value: int) -> bool:
    prctl = _libc_prctl()
    return prctl is not None and prctl(option, value, 0, 0, 0) == 0


_PRCTL: list = []


def _libc_prctl():
    """libc's prctl, looked up once (a forked child about to exec must not load libraries)."""
    if not _PRCTL:
        try:
            function = ctypes.CDLL(None, use_errno=True).prctl
            function.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
            function.restype = ctypes.c_int
        except (OSError, AttributeError):  # not Linux
            function = None
        _PRCTL.append(function)
    return _PRCTL[0]


def _reap(pids, wait_s: float = 0.0) -> None:
    """Collect the exit status of those of `pids` that are our own (adopted) children and have ended,
    so that no zombie is left behind. Only PIDs seen carrying the launch's token are passed here:
    other children of this process are not ours to wait for."""
    pending = set(pids)
    deadline = time.monotonic() + wait_s
    while pending:
        for pid in list(pending):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    pending.discard(pid)
            except (ChildProcessError, OSError):  # not our child (its parent reaps it), or already reaped
                pending.discard(pid)
        if not pending or time.monotonic() >= deadline:
            return
        time.sleep(0.02)


def _tokens(launch: str) -> list[str]:
    path = Path(launch)
    if os.sep not in launch:
        return [launch]
    run_dir = path if path.is_dir() else path.parent
    from launcher.runlock import holders

    return [holder.get("token", "") for holder in holders(run_dir) if holder.get("token")]
