"""Time to first step, by phase, measured on each rank.

The launcher puts its start time in MESHYARD_LAUNCHED_AT (or, under Ray, in the train loop's
config), so the first phase covers everything before the worker's own code ran: the executor
starting processes, the rendezvous, and importing torch.
"""
from __future__ import annotations

import os
import time

LAUNCHED_AT_ENV = "MESHYARD_LAUNCHED_AT"
PHASES = ("spawn", "pg_init", "model_build", "data_build", "first_step")


class StartupClock:
    def __init__(self, launched_at: float | None = None) -> None:
        if launched_at is None and os.environ.get(LAUNCHED_AT_ENV):
            launched_at = float(os.environ[LAUNCHED_AT_ENV])
        self._last = time.time()
        self.phases: dict[str, float] = {}
        if launched_at is not None:
            self.phases["spawn"] = self._last - launched_at

    def mark(self, phase: str) -> None:
        """Close `phase`: the time since the previous mark (repeated marks add up)."""
        now = time.time()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        self._last = now


def describe(phases: dict[str, float]) -> str:
    parts = " + ".join(f"{name.replace('_', ' ')} {phases[name]:.2f}" for name in PHASES if name in phases)
    return f"time to first step {sum(phases.values()):.2f} s = {parts}"
