"""Per-rank step timing and the straggler it reveals.

Ranks that share collectives finish every step together, so their step times agree and say nothing
about who held the others up. What differs is how a rank spent the step:

- data wait: wall time in `next(batches)` (the DataLoader, its workers, the dataset);
- compute: the time the main thread ran or was ready to run (on a CPU or in the run queue) in the
  rest of the step; from Linux's per-thread schedstat, so CPU contention counts as this rank's own
  slowness. Without schedstat (not Linux) it is the thread's CPU time, which misses contention;
- collective wait: the rest of the step, where the main thread slept, which outside `next(batches)`
  is blocking on collectives (a gloo wait sleeps on a condition variable).

A straggler shows a large data wait + compute ("own time"); its peers show the same time as
collective wait. Only the main thread is timed, and only on the host: on CUDA the host waits for
the GPU at synchronization points, often spinning, so collective waits may count as compute there
and mostly data stragglers stand out.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

SCHEDSTAT = Path("/proc/thread-self/schedstat")
CONSECUTIVE = 3  # logged intervals a rank must stay slowest beyond the threshold before it is named
# What `StragglerWatch.check` adds to a metrics record: wall-clock measurements, never equal between two runs.
FIELDS = ("rank_step_s", "rank_data_wait_s", "rank_compute_s", "rank_collective_wait_s", "slowest_rank",
          "slowest_excess", "straggler")


def _busy_s() -> float:
    """Seconds the calling thread has run or waited for a CPU."""
    try:
        on_cpu_ns, runqueue_ns, _ = SCHEDSTAT.read_text().split()
    except (OSError, ValueError):
        return time.thread_time()
    return (int(on_cpu_ns) + int(runqueue_ns)) / 1e9


class RankTimer:
    """This rank's step, data-wait and compute seconds, summed over one logged interval."""

    def __init__(self) -> None:
        self.steps, self.step_s, self.data_s, self.compute_s = 0, 0.0, 0.0, 0.0
        self._started = self._data_ready = self._busy = 0.0

    def start(self) -> None:
        self._started = time.perf_counter()

    def data_ready(self) -> None:
        self._data_ready, self._busy = time.perf_counter(), _busy_s()
        self.data_s += self._data_ready - self._started

    def stop(self) -> float:
        """End the step; its wall seconds."""
        now = time.perf_counter()
        self.compute_s += min(_busy_s() - self._busy, now - self._data_ready)
        step_s = now - self._started
        self.steps, self.step_s = self.steps + 1, self.step_s + step_s
        return step_s

    def take(self) -> tuple[float, float, float]:
        """(step, data wait, compute) seconds per step since the last take; starts a new interval."""
        steps = max(self.steps, 1)
        means = (self.step_s / steps, self.data_s / steps, self.compute_s / steps)
        self.steps, self.step_s, self.data_s, self.compute_s = 0, 0.0, 0.0, 0.0
        return means


def excess(own_s: list[float]) -> tuple[int, float] | None:
    """The slowest rank and how much its own time exceeds the median of the other ranks' (0.25 = 25%
    slower); None with one rank or when the others took no time at all."""
    if len(own_s) < 2:
        return None
    rank = max(range(len(own_s)), key=own_s.__getitem__)
    others = statistics.median(own_s[:rank] + own_s[rank + 1:])
    return (rank, own_s[rank] / others - 1) if others > 0 else None


class StragglerWatch:
    """Gathers every rank's timing at each logged step (one all-gather of 3 floats over the default
    group, which every strategy's ranks all belong to) and names a rank that stayed the slowest
    beyond the threshold for CONSECUTIVE logged intervals. The first interval of a launch is not
    judged: its first step starts the data loader and initializes lazily, unevenly across ranks."""

    def __init__(self, threshold: float, device: torch.device) -> None:
        self.threshold, self.device = threshold, device
        self._suspect: int | None = None
        self._streak = 0
        self._judged = False  # the first interval is not
        self.named: int | None = None

    def check(self, timer: RankTimer) -> tuple[dict[str, Any], str | None]:
        """The interval's per-rank fields for metrics.jsonl, and a console line when the named
        straggler changes. A collective: every rank calls it at the same steps."""
        return self.judge(_gather(torch.tensor(timer.take(), dtype=torch.float64, device=self.device)).tolist())

    def judge(self, table: list[list[float]]) -> tuple[dict[str, Any], str | None]:
        """`check` on every rank's (step, data wait, compute) seconds per step, in rank order."""
        step_s, data_s, compute_s = (list(column) for column in zip(*table))
        slowest = excess([d + c for d, c in zip(data_s, compute_s)])
        suspect = slowest[0] if self._judged and slowest is not None and slowest[1] > self.threshold else None
        self._judged = True
        self._streak = self._streak + 1 if suspect == self._suspect else 1
        self._suspect = suspect
        before, self.named = self.named, suspect if self._streak >= CONSECUTIVE else None
        fields = {"rank_step_s": _rounded(step_s), "rank_data_wait_s": _rounded(data_s),
                  "rank_compute_s": _rounded(compute_s),
                  "rank_collective_wait_s": _rounded([max(0.0, s - d - c) for s, d, c in table]),
                  "slowest_rank": None if slowest is None else slowest[0],
                  "slowest_excess": None if slowest is None else round(slowest[1], 4), "straggler": self.named}
        return fields, self._news(before, data_s, compute_s)

    def _news(self, before: int | None, data_s: list[float], compute_s: list[float]) -> str | None:
        if self.named == before:
            return None
        if self.named is None:
            return f"straggler: rank {before} caught up with the others"
        r = self.named
        others = [d + c for i, (d, c) in enumerate(zip(data_s, compute_s)) if i != r]
        return (f"straggler: rank {r} for {CONSECUTIVE} logged intervals: its own time"
                f" {1000 * (data_s[r] + compute_s[r]):.1f} ms/step (data wait {1000 * data_s[r]:.1f} ms, compute"
                f" {1000 * compute_s[r]:.1f} ms) vs a median {1000 * statistics.median(others):.1f} ms on the other"
                f" ranks, which wait for it in collectives (observe.straggler_threshold {self.threshold:g})")


def _gather(values: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values.unsqueeze(0)
    gathered = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, values)
    return torch.stack(gathered).cpu()


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 6) for v in values]
