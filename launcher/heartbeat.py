"""Per-rank heartbeat files and the hang diagnosis the launcher builds from them.

A daemon thread in each rank rewrites `<run>/heartbeats/rank<r>.json` every second with the last
completed step, the phase, and where the main thread is right now (its innermost Python frames).
Collectives release the GIL, so the thread keeps beating while the main thread waits on a peer;
that is what tells a rank stuck in its own code from ranks waiting for it. A rank whose beats stop
while the others' go on is frozen (SIGSTOP, a debugger, a C call that holds the GIL).

The launcher's watch (HangWatch) must decide before the process group's own timeout fires: once it
fires, the healthy ranks fail first ("Timed out") and would be blamed. Each beat therefore says how
long the main thread has been waiting in the same collective (`waiting_s`), and the watch declares
a hang when any rank has waited `watch_seconds(timeout)` - a margin short of the timeout.

Each beat also carries, per process group, the last collective the rank entered (torch's Flight
Recorder, launcher/flight_recorder.py), and the heartbeat thread answers the launcher's request for
the whole recorder: the report then names the ranks that had not entered the collective the others
wait in.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from launcher.atomic import write_text_atomic
from launcher.flight_recorder import DUMP_DIR, DumpOnRequest, Unentered, entered, not_entered, request_dumps
from launcher.rundir import RunDir

INTERVAL_S = 1.0
FROZEN_AFTER_S = 5.0  # a rank whose beats lag the others' by this much has stopped running
DUMP_WAIT_S = 3.0  # how long a hang report waits for the ranks' Flight Recorder dumps (within the watch's margin)
# Frames inside these files mean "waiting for other ranks", not "stuck in this rank's own code".
COMMUNICATION_PATHS = ("torch/distributed/", "torch/nn/parallel/", "torch/autograd/", "torch/_tensor.py",
                       "launcher/guards.py")  # the per-step agreement waits there


class Heartbeat:
    def __init__(self, run_dir: Path, rank: int) -> None:
        self.path = RunDir(run_dir).heartbeats / f"rank{rank}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank, self.step, self.phase = rank, 0, "setup"
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._failing = False  # the last write failed (said once until a write succeeds again)
        self._waiting: tuple[Any, ...] | None = None  # (step, phase, innermost frame) of the current wait
        self._waiting_since = 0.0
        self._thread = threading.Thread(target=self._run, name="meshyard-heartbeat", daemon=True)
        self._dump = DumpOnRequest(self.path.parent, rank)

    def start(self) -> Heartbeat:
        self._write()
        self._thread.start()
        return self

    def update(self, step: int, phase: str) -> None:
        self.step, self.phase = step, phase

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * INTERVAL_S)

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            self._write()

    def _write(self) -> None:
        """One beat. A failed write (disk full, the directory gone for a moment) is said once and
        retried at the next beat: a dead heartbeat thread would get a healthy job killed as hung."""
        self._dump.poll()
        stack = innermost_frames(sys._current_frames().get(self._main) if self._main is not None else None)
        now = time.time()
        beat = {"rank": self.rank, "pid": os.getpid(), "step": self.step, "phase": self.phase,
                "time": now, "stack": stack, "waiting_s": self._waited(stack, now), "collectives": entered()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps(beat))
        except OSError as exc:
            if not self._failing:
                _say(f"warning: rank {self.rank}: heartbeat write failed ({exc}); retrying every {INTERVAL_S:g} s")
            self._failing = True
        else:
            self._failing = False


    def _waited(self, stack: list[str], now: float) -> float:
        """Seconds the main thread has been in the same wait for peers (0 when not waiting)."""
        if not stack or not _is_communication(stack[-1]):
            self._waiting = None
            return 0.0
        where = (self.step, self.phase, stack[-1])
        if where != self._waiting:
            self._waiting, self._waiting_since = where, now
        return now - self._waiting_since


def _say(line: str) -> None:
    """On stdout: local rank 0's reaches the console (a rank's stderr, and the other ranks' stdout, go
    to its log file under the run directory, launcher/executors/local.py). That file may be on the
    disk that is full: the line is then lost, not the heartbeat thread."""
    try:
        print(line, flush=True)
    except OSError:
        pass


def innermost_frames(frame: FrameType | None, limit: int = 8) -> list[str]:
    """'file:line in function' for the innermost frames, outermost first.

    Walks only `limit` frames and reads no source lines: this runs every second next to training,
    and extracting the whole stack with its source text measurably slowed the steps.
    """
    if frame is None:
        return []
    summary = traceback.StackSummary.extract(itertools.islice(traceback.walk_stack(frame), limit), lookup_lines=False)
    return [f"{f.filename}:{f.lineno} in {f.name}" for f in reversed(summary)]


def read_heartbeats(directory: Path) -> dict[int, dict[str, Any]]:
    beats = {}
    for path in directory.glob("rank*.json"):
        try:
            beat = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        beats[int(beat["rank"])] = beat
    return beats


def _is_communication(frame: str) -> bool:
    return any(part in frame.replace("\\", "/") for part in COMMUNICATION_PATHS)


def in_communication(beat: dict[str, Any]) -> bool:
    return bool(beat.get("stack")) and _is_communication(beat["stack"][-1])


def frozen_ranks(beats: dict[int, dict[str, Any]]) -> dict[int, float]:
    """rank -> seconds its last beat is older than the newest beat of any rank, for ranks that stopped
    beating while others went on. Relative to the other ranks, not to now, so it holds after the job
    ended too (every beat is old then, the frozen rank's much older)."""
    if len(beats) < 2:
        return {}
    newest = max(b["time"] for b in beats.values())
    return {r: newest - b["time"] for r, b in beats.items() if newest - b["time"] > FROZEN_AFTER_S}


def hang_report(directory: Path) -> dict[int, str]:
    """`diagnose` of a job the launcher just called hung, while its ranks still run: with the Flight
    Recorder dumps of the ranks that still beat and have a recorder, and where those dumps are."""
    beats = read_heartbeats(directory)
    frozen = frozen_ranks(beats)
    recording = [r for r, b in beats.items() if b.get("collectives") and r not in frozen]
    dumps = request_dumps(directory, recording, DUMP_WAIT_S) if recording else {}
    report = diagnose(beats, dumps)
    if dumps and report:
        first = next(iter(report))
        report[first] += (f"\n  Flight Recorder dumps of rank(s) {_ranks(dumps)}:"
                          f" {directory / DUMP_DIR}/rank<r>.json")
    return report


def diagnose(beats: dict[int, dict[str, Any]], dumps: dict[int, dict[str, Any]] | None = None) -> dict[int, str]:
    """rank -> what it was doing, stuck ranks first: frozen ones, else those that had not entered a
    collective others are in (Flight Recorder counts), else those outside communication, else the
    slowest. `dumps`: rank -> its Flight Recorder dump, where the ranks could answer."""
    if not beats:
        return {}
    frozen = frozen_ranks(beats)
    # A frozen rank's last beat is up to a beat interval older than its last collective: not compared.
    unentered = not_entered({r: b.get("collectives") or {} for r, b in beats.items() if r not in frozen}, dumps or {})
    missing = sorted({r for u in unentered for r in u.missing})
    outside = [r for r, b in beats.items() if not in_communication(b)]
    lowest = min(b["step"] for b in beats.values())
    stuck = list(frozen) or missing or outside or [r for r, b in beats.items() if b["step"] == lowest]
    waiting = [r for r, b in beats.items() if r not in stuck and in_communication(b)]
    judge_by_stacks = bool(waiting) and not any(b.get("collectives") for b in beats.values())
    report = {}
    for rank in sorted(beats, key=lambda r: (r not in stuck, r)):
        beat = beats[rank]
        where = beat["stack"][-1] if beat.get("stack") else "unknown"
        if rank in frozen:
            lines = [f"stopped responding after step {beat['step']} ({beat['phase']}): no heartbeat for"
                     f" {frozen[rank]:.0f} s while the others beat (process stopped or frozen), last in {where}"]
        elif rank in stuck:
            lines = [f"stuck after step {beat['step']} ({beat['phase']}), in {where}"]
        else:
            report[rank] = (f"waiting for peers after step {beat['step']} ({beat['phase']})"
                            f"{_entered_by(rank, unentered)}, in {where}")
            continue
        lines += [f"  {frame}" for frame in beat.get("stack", [])[-6:-1]]
        lines += [f"  had not entered {u.describe()}, which rank(s) {_ranks(u.inside)} entered"
                  for u in unentered if rank in u.missing]
        if judge_by_stacks and not in_communication(beat):
            lines.append(f"  had not entered the collective rank(s) {_ranks(waiting)} wait in"
                         " (judged from the stacks: no Flight Recorder counts)")
        report[rank] = "\n".join(lines)
    return report


def _entered_by(rank: int, unentered: list[Unentered]) -> str:
    """', in collective #57 of group 0 (gloo:all_reduce [[33]]), which rank 1 had not entered' for a rank inside."""
    return "".join(f", in {u.describe()}, which rank(s) {_ranks(u.missing)} had not entered"
                   for u in unentered if rank in u.inside)


def _ranks(ranks: Any) -> str:
    return ", ".join(str(r) for r in sorted(ranks))


def watch_seconds(timeout_s: float) -> float:
    """How long a rank may wait in one collective before the launcher calls the job hung: short of
    the process group's timeout by 20% (at least 5 s), so the diagnosis comes first."""
    return max(0.5 * timeout_s, timeout_s - max(5.0, 0.2 * timeout_s))


class HangWatch:
    """Declares a hang, once every rank has beaten at least once, when
    - a rank has waited for its peers in one collective for `watch_seconds(timeout_s)` (any phase,
      start-up included), or
    - after start-up, no rank progressed (step or phase) for timeout_s (ranks stuck in their own code).
    """

    def __init__(self, directory: Path, world_size: int, timeout_s: float) -> None:
        self.directory, self.world_size, self.timeout_s = directory, world_size, timeout_s
        self.watch_s = watch_seconds(timeout_s)
        self._last_state: tuple[Any, ...] | None = None
        self._last_change = time.monotonic()

    def stalled(self) -> bool:
        beats = read_heartbeats(self.directory)
        if len(beats) < self.world_size:
            self._last_change = time.monotonic()  # still starting: the agent's rendezvous has its own timeout
            return False
        # The waits of the ranks that still beat. A beat that stopped coming is not extrapolated: its
        # rank may be frozen, or just unable to write (disk full); a frozen rank's peers wait on it.
        if any(b.get("waiting_s", 0.0) > self.watch_s for b in beats.values()):
            return True
        state = tuple(sorted((r, b["step"], b["phase"]) for r, b in beats.items()))
        if state != self._last_state or any(b["phase"].startswith("setup") for b in beats.values()):
            self._last_state, self._last_change = state, time.monotonic()
        return time.monotonic() - self._last_change > self.timeout_s
