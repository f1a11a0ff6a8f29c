"""Executors start the per-rank worker processes; they never train.

Looked up by name and imported lazily, so a local run never imports Ray, Accelerate or DeepSpeed.
"""
from __future__ import annotations

import importlib
from typing import Any

from launcher.errors import UserError

EXECUTORS = {"local": "launcher.executors.local:LocalExecutor"}


def get_executor(name: str) -> Any:
    if name not in EXECUTORS:
        raise UserError(f"--executor {name}: unknown executor; allowed: {', '.join(EXECUTORS)}")
    module, _, cls = EXECUTORS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()
