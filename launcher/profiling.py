"""observe.profile: torch.profiler over optimizer steps a..b on the listed ranks, one Chrome trace each.

The trainer marks where each step begins and ends; this records the steps in range, each inside a
`ProfilerStep#<step>` range numbered by the optimizer step (torch.profiler's schedule would number
them from 0 at this launch's start), and writes `<run>/profile/rank<N>.json` after step b.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from launcher.atomic import atomic_target
from launcher.rundir import RunDir
from launcher.spec.schema import ProfileSpec


class StepProfiler:
    def __init__(self, spec: ProfileSpec | None, rank: int, files: RunDir, device: str) -> None:
        self.first, self.last = spec.steps if spec is not None and rank in spec.ranks else (0, -1)
        self.trace = files.profile_trace(rank)
        self.device = device
        self._profile: profile | None = None
        self._step_range: Any = None

    def step_begins(self, step: int) -> None:
        if not self.first <= step <= self.last:
            return
        if self._profile is None:  # step a, or the first step of a launch that resumed inside the range
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device == "cuda" else [])
            self._profile = profile(activities=activities, record_shapes=True, profile_memory=True)
            self._profile.start()
        self._step_range = record_function(f"ProfilerStep#{step}")
        self._step_range.__enter__()

    def step_ends(self, step: int) -> None:
        if self._step_range is not None:
            self._step_range.__exit__(None, None, None)
            self._step_range = None
        if step == self.last:
            self.close()

    def close(self) -> None:
        """Stops a profile in progress (the launch ended inside the range) and writes its trace."""
        if self._profile is None:
            return
        if self.device == "cuda":
            torch.cuda.synchronize()
        self._profile.stop()
        self.trace.parent.mkdir(parents=True, exist_ok=True)
        with atomic_target(self.trace) as tmp:
            self._profile.export_chrome_trace(str(tmp))
        self._profile = None
