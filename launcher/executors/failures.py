"""What the ranks of a torch elastic launch (torchrun, `accelerate launch`) left in its log directory.

Layout (torch elastic's): <log-dir>/<run id>/attempt_N/<local rank>/ holds error.json (the rank's
exception, written by the worker's @record, or by the agent for a rank that died without one:
launcher/executors/agent.py), stdout.log and stderr.log (launcher/executors/local.py's --redirects).
The console gets the launcher's summary; the full tracebacks stay in these files.
"""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from launcher.worker import GLOBAL_RANK_FILE

TRACE_LINES = 4


def collect_failures(log_dir: Path, since: float, attempts: str = "*/attempt_*") -> dict[int, str]:
    """rank -> 'ExcType: message' plus the last traceback lines, from the error files written since `since`.

    Ordered by failure time, except that a rank that died without a Python error (a segfault, an
    out-of-memory kill; not the agent's SIGTERM to the survivors) comes first: its peers then raise
    "Connection closed by peer" before the agent has even seen it die. The first entry is the root
    cause, later ones are usually ranks that lost their peer.
    """
    found: list[tuple[bool, float, int, str]] = []
    for error_file in log_dir.glob(f"{attempts}/*/error.json"):
        when = error_file.stat().st_mtime  # finer than the file's own whole-second timestamp
        if when < since:
            continue
        try:
            content = json.loads(error_file.read_text())
            payload = content["message"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(payload, dict):
            message = str(payload.get("message", "")).strip()
            stack = str(payload.get("extraInfo", {}).get("py_callstack", "")).strip().splitlines()
        else:
            message, stack = str(payload), []
        tail = [line for line in stack[:-1] if line.strip(" ^~")][-TRACE_LINES:]  # not the caret lines
        headline = message.splitlines()[-1] if message else "?"
        died = content.get("exitcode", -signal.SIGTERM) != -signal.SIGTERM  # only in the agent's notes
        found.append((not died, when, _global_rank(error_file), "\n".join([headline] + tail)))
    return {rank: text for _, _, rank, text in sorted(found)}


def attempts(log_dir: Path, since: float) -> list[Path]:
    """This launch's attempt directories (one per start of the rank group), oldest first."""
    found = [path for path in log_dir.glob("*/attempt_*") if path.stat().st_mtime >= since]
    return sorted(found, key=lambda path: int(path.name.removeprefix("attempt_")))


def rank_logs(attempt: Path) -> str:
    """Where each rank's full output is, for the console."""
    return f"{attempt}/<local rank>/stdout.log, stderr.log"


class RestartNotices:
    """Says on the console why the agent restarted the rank group (its own account is silenced)."""

    def __init__(self, log_dir: Path, since: float) -> None:
        self.log_dir, self.since, self.seen = log_dir, since, 1  # attempt_0 is the first start, not a restart

    def poll(self) -> None:
        started = attempts(self.log_dir, self.since)
        for failed, restarted in zip(started[self.seen - 1 : -1], started[self.seen :]):
            failures = collect_failures(failed.parent, self.since, failed.name)
            why = (f"rank {next(iter(failures))} failed: {next(iter(failures.values())).splitlines()[0]}"
                   if failures else "a rank stopped without a Python error")
            print(f"restarting every rank ({restarted.name}): {why}; its output: {rank_logs(failed)}",
                  file=sys.stderr, flush=True)
        self.seen = max(self.seen, len(started))


def _global_rank(error_file: Path) -> int:
    """The rank the worker wrote next to its error file (launcher/worker.py); the local rank torchrun
    filed it under when there is none (a rank that died before it could write)."""
    try:
        return int((error_file.parent / GLOBAL_RANK_FILE).read_text())
    except (OSError, ValueError):
        return int(error_file.parent.name)
