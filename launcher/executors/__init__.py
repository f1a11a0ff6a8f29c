"""Executors start the per-rank worker processes; they never train.

Looked up by name and imported lazily, so a local run never imports Ray, Accelerate or DeepSpeed.
Each has a pure `dry_run(job, options) -> LaunchRequest` and a `run(request)` that performs it.
"""
from __future__ import annotations

import importlib
from typing import Any

from launcher.errors import UserError

EXECUTORS = {
    "local": "launcher.executors.local:LocalExecutor",
    "ray": "launcher.executors.ray:RayExecutor",
    "accelerate": "launcher.executors.accelerate:AccelerateExecutor",
}


def check_executor(name: str) -> None:
    if name not in EXECUTORS:
        raise UserError(f"--executor {name}: unknown executor; allowed: {', '.join(EXECUTORS)}")


def get_executor(name: str) -> Any:
    check_executor(name)
    module, _, cls = EXECUTORS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()
