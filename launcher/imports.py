"""Resolve `"module:callable"` import paths (the spec's `target` and `loss` fields)."""
from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from launcher.errors import SpecError


def ensure_cwd_importable() -> None:
    """User code lives where the user launches from, as with `python -m` and torchrun."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


def resolve(path: str, field: str) -> Callable[..., Any]:
    """Import `module:attr.sub` and return the callable, or raise a SpecError naming `field`."""
    ensure_cwd_importable()
    module_name, _, attr_path = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(field, f"cannot import module {module_name!r} ({exc})") from None
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise SpecError(field, f"module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise SpecError(field, f"{path} is not callable")
    return obj
