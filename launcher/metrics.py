"""Rank 0's view of the run: metrics.jsonl, a progress bar, and a summary line per log interval."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
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
    """Only the logging rank writes; the others get a logger that does nothing."""

    def __init__(self, run_dir: Path, enabled: bool, start_step: int, max_steps: int) -> None:
        self.enabled = enabled
        self.path = run_dir / METRICS_FILE
        self.bar = None
        if not enabled:
            return
        # On resume, drop records past the checkpoint so the file reads as one uninterrupted run.
        kept = [m for m in read_metrics(run_dir) if m["step"] <= start_step]
        self.path.write_text("".join(json.dumps(m) + "\n" for m in kept))
        if sys.stderr.isatty():
            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")  # one write per record: a kill cuts at most the last line
        self.say(format_record(record))

    def say(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_record(r: dict[str, Any]) -> str:
    parts = [f"step {r['step']:>6}", f"loss {r['loss']:.5f}"]
    if r.get("penalty"):
        parts.append(f"penalty {r['penalty']:.5f}")
    if "eval_loss" in r:
        parts.append(f"eval_loss {r['eval_loss']:.5f}")
    if "eval_accuracy" in r:
        parts.append(f"eval_acc {r['eval_accuracy']:.3f}")
    parts += [f"lr {r['lr']:.2e}", f"grad_norm {r['grad_norm']:.3f}",
              f"{r['samples_per_s']:.0f} samples/s", f"{1000 * r['step_time_s']:.1f} ms/step"]
    return " | ".join(parts)
