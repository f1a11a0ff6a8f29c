"""Per-rank heartbeat files and the hang diagnosis the launcher builds from them.

A daemon thread in each rank rewrites `<run>/heartbeats/rank<r>.json` every second with the last
completed step, the phase, and where the main thread is right now (its innermost Python frames).
Collectives release the GIL, so the thread keeps beating while the main thread waits on a peer;
that is what tells a rank stuck in its own code from ranks waiting for it.
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

HEARTBEAT_DIR = "heartbeats"
INTERVAL_S = 1.0
# Frames inside these files mean "waiting for other ranks", not "stuck in this rank's own code".
COMMUNICATION_PATHS = ("torch/distributed/", "torch/nn/parallel/", "torch/autograd/", "torch/_tensor.py",
                       "launcher/guards.py")  # the per-step agreement waits there


class Heartbeat:
    def __init__(self, run_dir: Path, rank: int) -> None:
        self.path = run_dir / HEARTBEAT_DIR / f"rank{rank}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank, self.step, self.phase = rank, 0, "setup"
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._failing = False  # the last write failed (said once until a write succeeds again)
        self._thread = threading.Thread(target=self._run, name="meshyard-heartbeat", daemon=True)

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
        stack = innermost_frames(sys._current_frames().get(self._main))
        beat = {"rank": self.rank, "pid": os.getpid(), "step": self.step, "phase": self.phase,
                "time": time.time(), "stack": stack}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps(beat))
        except OSError as exc:
            if not self._failing:
                print(f"rank {self.rank}: heartbeat write failed ({exc}); retrying every {INTERVAL_S:g} s",
                      file=sys.stderr, flush=True)
            self._failing = True
        else:
            self._failing = False


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


def in_communication(beat: dict[str, Any]) -> bool:
    innermost = beat["stack"][-1] if beat.get("stack") else ""
    return any(part in innermost.replace("\\", "/") for part in COMMUNICATION_PATHS)


def diagnose(beats: dict[int, dict[str, Any]]) -> dict[int, str]:
    """rank -> what it was doing, stuck ranks first: those outside communication, else the slowest."""
    if not beats:
        return {}
    outside = [r for r, b in beats.items() if not in_communication(b)]
    lowest = min(b["step"] for b in beats.values())
    stuck = outside or [r for r, b in beats.items() if b["step"] == lowest]
    report = {}
    for rank in sorted(beats, key=lambda r: (r not in stuck, r)):
        beat = beats[rank]
        where = beat["stack"][-1] if beat.get("stack") else "unknown"
        if rank in stuck:
            lines = [f"stuck after step {beat['step']} ({beat['phase']}), in {where}"]
            lines += [f"  {frame}" for frame in beat.get("stack", [])[-6:-1]]
            report[rank] = "\n".join(lines)
        else:
            report[rank] = f"waiting for peers after step {beat['step']} ({beat['phase']}), in {where}"
    return report


class HangWatch:
    """Declares a hang when every rank has beaten at least once and none progressed for timeout_s."""

    def __init__(self, directory: Path, world_size: int, timeout_s: float) -> None:
        self.directory, self.world_size, self.timeout_s = directory, world_size, timeout_s
        self._last_state: tuple[Any, ...] | None = None
        self._last_change = time.monotonic()

    def stalled(self) -> bool:
        beats = read_heartbeats(self.directory)
        if len(beats) < self.world_size or any(b["phase"] == "setup" for b in beats.values()):
            self._last_change = time.monotonic()  # still starting: rendezvous and init have their own timeouts
            return False
        state = tuple(sorted((r, b["step"], b["phase"]) for r, b in beats.items()))
        if state != self._last_state:
            self._last_state, self._last_change = state, time.monotonic()
        return time.monotonic() - self._last_change > self.timeout_s
