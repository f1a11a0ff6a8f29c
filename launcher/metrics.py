"""Rank 0's view of the run: metrics.jsonl, a progress bar, and a summary line per log interval."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from launcher.rundir import RunDir

if TYPE_CHECKING:  # launcher.trackers reads metrics.jsonl through this module
    from launcher.trackers import Tracker


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = RunDir(run_dir).metrics
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a killed rank 0; the resume re-logs that step
    return records


class MetricsLogger:
    """Only the logging rank writes; the others get a logger that does nothing. Each record goes to
    metrics.jsonl and to every tracker (launcher/trackers) the logging rank opened."""

    def __init__(self, run_dir: Path, enabled: bool, start_step: int, max_steps: int,
                 trackers: Sequence[Tracker] = ()) -> None:
        self.enabled = enabled
        self.trackers = trackers
        self.path = RunDir(run_dir).metrics
        self.bar = None
        self._unwritten: list[str] = []  # records a failed write (disk full) left in memory, oldest first
        if not enabled:
            return
        # On resume, drop records past the checkpoint so the file reads as one uninterrupted run.
        kept = [m for m in read_metrics(run_dir) if m["step"] <= start_step]
        self.path.write_text("".join(json.dumps(m) + "\n" for m in kept))
        if sys.stdout.isatty():  # stdout: a rank's stderr goes to its log file (launcher/executors/local.py)
            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stdout)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._unwritten.append(json.dumps(record) + "\n")
        try:
            append_whole(self.path, "".join(self._unwritten))
        except OSError as exc:  # a full disk for a while must not end the run: keep the records, retry next time
            if len(self._unwritten) == 1:
                self.say(f"warning: {self.path}: {exc.strerror or exc};"
                         " holding records in memory until it can be written")
        else:
            self._unwritten.clear()
        for tracker in self.trackers:
            tracker.log_record(record)
        self.say(format_record(record))

    def say(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        """Writes what a full disk held back; if it still cannot, the run ends with that error."""
        if self.bar is not None:
            self.bar.close()
        if self._unwritten:
            append_whole(self.path, "".join(self._unwritten))
            self._unwritten.clear()

    def finish_trackers(self, summary: dict[str, Any]) -> None:
        """The run summary to every tracker, which then flushes and lets its run go."""
        for tracker in self.trackers:
            tracker.finish(summary)


def append_whole(path: Path, text: str) -> None:
    """Append `text` or nothing: a write cut short (disk full) is truncated away, so the file never
    holds half a record that the retry would glue to the next one. One write per call: a kill cuts at
    most the last line (read_metrics skips it)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        data = memoryview(text.encode())
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def format_record(r: dict[str, Any]) -> str:
    parts = [f"step {r['step']:>6}", f"loss {r['loss']:.5f}"]
    if r.get("penalty"):
        parts.append(f"penalty {r['penalty']:.5f}")
    if "eval_loss" in r:
        parts.append(f"eval_loss {r['eval_loss']:.5f}")
    if "eval_accuracy" in r:
        parts.append(f"eval_acc {r['eval_accuracy']:.3f}")
    parts += [f"lr {r['lr']:.2e}", f"grad_norm {r['grad_norm']:.3f}",
              f"{r['samples_per_s']:.0f} samples/s"]
    if "tokens_per_s" in r:
        parts.append(f"{r['tokens_per_s']:.0f} tokens/s")
    if "mfu" in r:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    parts.append(f"{1000 * r['step_time_s']:.1f} ms/step")
    return " | ".join(parts)
