"""Time to first step, by phase, measured on each rank.

The launcher puts the moment its process started in MESHYARD_LAUNCHED_AT (or, under Ray, in the
train loop's config), so the first phase covers everything before the worker's own code ran: the
launcher's own interpreter start and imports, the executor starting processes, the rendezvous, and
importing torch. The figure is what a user waits after pressing Enter.
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


def process_started_at() -> float:
    """When this process started (wall clock), to about 10 ms.

    On Linux from the kernel's own clocks: the start in clock ticks since boot (/proc/self/stat)
    against CLOCK_BOOTTIME now. psutil's create_time adds that start to the boot time, which the
    kernel gives in whole seconds, so it can be early by up to a second.
    """
    try:
        with open("/proc/self/stat") as stat:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux
        import psutil  # here only: the ranks import this module too, and need no psutil

        return psutil.Process().create_time()


def describe(phases: dict[str, float]) -> str:
    parts = " + ".join(f"{name.replace('_', ' ')} {phases[name]:.2f}" for name in PHASES if name in phases)
    return f"time to first step {sum(phases.values()):.2f} s = {parts}"
