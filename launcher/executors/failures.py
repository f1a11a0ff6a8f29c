"""What the ranks of a torch elastic launch (torchrun, `accelerate launch`) left in its log directory.

Layout (torch elastic's): <log-dir>/<run id>/attempt_N/<local rank>/ holds error.json (the rank's
exception, written by the worker's @record, or by the agent for a rank that died without one:
launcher/executors/agent.py), stdout.log and stderr.log (launcher/executors/local.py's --redirects).
The console gets the launcher's summary; the full tracebacks stay in these files.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NamedTuple

from launcher.errors import lost_a_peer
from launcher.worker import GLOBAL_RANK_FILE

TRACE_LINES = 4
AGENT_NOTE = "exitcode"  # the key only the agent's error files have (a rank that died without a Python error)


class Failure(NamedTuple):
    rank: int
    text: str  # 'ExcType: message' plus the last traceback lines
    log_dir: Path  # the rank's stdout.log and stderr.log


def attempts(log_dir: Path, since: float) -> list[Path]:
    """This launch's attempt directories (one per start of the rank group), oldest first."""
    found = [path for path in log_dir.glob("*/attempt_*") if path.stat().st_mtime >= since]
    return sorted(found, key=lambda path: int(path.name.removeprefix("attempt_")))


def read_failures(attempt: Path) -> list[Failure]:
    """The failed ranks of one attempt, the root cause first.

    Ordered by failure time, except that a rank that died without a Python error (a segfault, an
    out-of-memory kill) comes first: its peers raise "Connection closed by peer" before the agent
    has even seen it die; and a rank that only lost its peer comes after every rank with an error
    of its own (on a multi-node job the failing rank may be on another node: this node's ranks
    then all lost their peer, and the report says so).
    """
    found: list[tuple[bool, bool, float, Failure]] = []
    for error_file in attempt.glob("*/error.json"):
        try:
            when = error_file.stat().st_mtime  # finer than the file's own whole-second timestamp
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
        failure = Failure(_global_rank(error_file), "\n".join([headline] + tail), error_file.parent)
        found.append((AGENT_NOTE not in content, lost_a_peer(headline), when, failure))
    return [failure for *_, failure in sorted(found, key=lambda item: item[:3])]


def newest_attempt(log_dir: Path, since: float) -> Path | None:
    """The attempt that ended this launch (earlier ones were restarted); None if no rank group started."""
    started = attempts(log_dir, since)
    return started[-1] if started else None


def where_logs_are(attempt: Path | None, failures: list[Failure]) -> str | None:
    """One console line: where the first failing rank's traceback is, and every rank's output."""
    if attempt is None:
        return None
    every = f"{attempt}/<local rank>/stderr.log, stdout.log"
    if not failures:
        return f"every rank's full output: {every}"
    return f"rank {failures[0].rank}'s full output: {failures[0].log_dir / 'stderr.log'}; every rank's: {every}"


class RestartNotices:
    """Says on the console why the agent restarted the rank group (its own account is silenced)."""

    def __init__(self, log_dir: Path, since: float) -> None:
        self.log_dir, self.since, self.seen = log_dir, since, 1  # attempt_0 is the first start, not a restart

    def poll(self) -> None:
        started = attempts(self.log_dir, self.since)
        for failed, restarted in zip(started[self.seen - 1 : -1], started[self.seen :]):
            failures = read_failures(failed)
            why = (f"rank {failures[0].rank} failed: {failures[0].text.splitlines()[0]}; its full output:"
                   f" {failures[0].log_dir / 'stderr.log'}" if failures else f"a rank stopped; output: {failed}")
            print(f"restarting every rank ({restarted.name}): {why}", file=sys.stderr, flush=True)
        self.seen = max(self.seen, len(started))


def _global_rank(error_file: Path) -> int:
    """The rank the worker (or the agent) wrote next to its error file (launcher/worker.py); the local
    rank torchrun filed it under when there is none."""
    try:
        return int((error_file.parent / GLOBAL_RANK_FILE).read_text())
    except (OSError, ValueError):
        return int(error_file.parent.name)
