"""`meshyard runs`: what each run directory under a folder says about its newest launch.

A run's status is read from what its processes leave behind, newest launch only:

- running: a launch holds the run's lock (launcher/runlock.py), or the launch has not ended and a
  rank's heartbeat is under LIVE_S old (ranks whose launcher is on another machine without a
  shared flock, or that outlived it).
- The newest launch that started the job rewrote spec.json just before starting it, so only end
  records at least as new count: the trainer's summary.json (finished; stopped at
  training.stop_at_step; preempted, with preempted.json) and the launcher's failed.json (failed,
  interrupted, or preempted before a checkpoint), whichever is newer.
- Neither: the launch ended without a word (its launcher was killed): failed.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from launcher.atomic import write_text_atomic
from launcher.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, UserError
from launcher.heartbeat import read_heartbeats
from launcher.metrics import read_metrics
from launcher.rundir import RunDir
from launcher.runlock import held

LIVE_S = 10.0  # a heartbeat (rewritten every second) older than this is from a process that stopped
FAILURE_STATUS: dict[object, str] = {EXIT_PREEMPTED: "preempted", EXIT_INTERRUPTED: "interrupted"}  # else failed


@dataclass(frozen=True)
class RunStatus:
    name: str
    path: str
    status: str  # running | finished | stopped | preempted | interrupted | failed
    steps: int  # the last completed step (while running or after a failure: the last logged one)
    max_steps: int | None
    final_loss: float | None
    wall_s: float | None  # the newest launch's: trained so far, or until it ended
    error: str | None = None


def record_failure(run_dir: Path, exit_code: int, error: str, started: float) -> None:
    """The launcher's end record for a launch that ended without the job's summary (see RunDir.failed)."""
    record = {"exit_code": exit_code, "error": error.splitlines()[0] if error else "", "wall_s": time.time() - started}
    write_text_atomic(RunDir(run_dir).failed, json.dumps(record))


def list_runs(directory: Path) -> list[RunStatus]:
    """Every run directory in `directory` (or `directory` itself if it is one), by name."""
    if not directory.is_dir():
        raise UserError(f"{directory}: no such directory (give the output.dir that holds the runs)")
    if is_run_dir(directory):
        return [run_status(directory)]
    return [run_status(path) for path in sorted(directory.iterdir()) if path.is_dir() and is_run_dir(path)]


def is_run_dir(path: Path) -> bool:
    files = RunDir(path)
    return files.spec.is_file() or files.metrics.is_file()


def run_status(path: Path, now: float | None = None) -> RunStatus:
    now = time.time() if now is None else now
    files = RunDir(path)
    records = read_metrics(path)
    logged_step = records[-1]["step"] if records else 0
    final_loss = records[-1].get("loss") if records else None
    spec = _read_json(files.spec) or {}
    max_steps = spec.get("training", {}).get("max_steps")
    started = _mtime(files.spec) or 0.0
    summary = _since(files.summary, started)
    failure = _since(files.failed, started)
    if failure is not None and summary is not None and (_mtime(files.summary) or 0) > (_mtime(files.failed) or 0):
        failure = None  # both written since the launch started: the newer one says how it ended
    steps, wall_s, error = logged_step, None, None
    if held(path) or (summary is None and failure is None and _beating(files.heartbeats, now)):
        status, wall_s = "running", (now - started if started else None)
    elif failure is not None:
        code = failure.get("exit_code")
        status, wall_s, error = FAILURE_STATUS.get(code, "failed"), failure.get("wall_s"), failure.get("error")
    elif summary is not None:
        steps, wall_s = int(summary.get("steps") or logged_step), summary.get("wall_s")
        max_steps = summary.get("max_steps", max_steps)
        status = "preempted" if summary.get("preempted") else "stopped" if steps < (max_steps or 0) else "finished"
    else:
        status = "failed"
        error = "ended without a summary (its launcher was killed?)" if started else "no spec.json"
    return RunStatus(path.name, str(path), status, steps, max_steps, final_loss, wall_s, error)


def _beating(directory: Path, now: float) -> bool:
    return any(now - float(beat.get("time", 0)) < LIVE_S for beat in read_heartbeats(directory).values())


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _since(path: Path, started: float) -> dict[str, Any] | None:
    """The JSON record at `path` if it was written since `started` (by the newest launch)."""
    written = _mtime(path)
    return _read_json(path) if written is not None and written >= started else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def render_table(runs: list[RunStatus]) -> str:
    """An aligned table (text columns left, numbers right), then each early end's reason."""
    header = ("NAME", "STATUS", "STEPS", "LOSS", "WALL")
    rows = [(r.name, r.status, f"{r.steps}/{r.max_steps if r.max_steps is not None else '?'}",
             "-" if r.final_loss is None else f"{r.final_loss:.4g}", _duration(r.wall_s)) for r in runs]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    lines += [f"{r.name}: {r.error}" for r in runs if r.error]  # why a launch ended early, below the table
    return "\n".join(lines)


def render_json(runs: list[RunStatus]) -> str:
    return json.dumps([asdict(r) for r in runs], indent=1)


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
