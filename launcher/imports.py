"""Resolve `"module:callable"` import paths (the spec's `target` and `loss` fields)."""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from launcher.errors import SpecError


def ensure_cwd_importable() -> None:
    """User code lives where the user launches from, as with `python -m` and torchrun."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


def resolve(path: str, field: str) -> Callable[..., Any]:
    """Import `module:attr.sub` and return the callable, or raise a SpecError naming `field`.

    Whatever the user's module does at import (raise anything, call sys.exit) becomes that one
    SpecError; only Ctrl-C passes through.
    """
    ensure_cwd_importable()
    module_name, _, attr_path = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(field, f"cannot import module {module_name!r} ({_brief(exc)})") from None
    except SystemExit as exc:  # sys.exit(0) at import would otherwise end `launch` with "success"
        raise SpecError(field, f"importing module {module_name!r} called sys.exit({exc.code!r})") from None
    except Exception as exc:  # noqa: BLE001 - user code: any error is reported, none is a traceback
        raise SpecError(field, f"importing module {module_name!r} raised {type(exc).__name__}: {_brief(exc)}") from None
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise SpecError(field, f"module {module_name!r} has no attribute {attr_path!r}") from None
        except Exception as exc:  # noqa: BLE001 - a module __getattr__ or a property can raise anything
            raise SpecError(field, f"reading {path} raised {type(exc).__name__}: {_brief(exc)}") from None
    if not callable(obj):
        raise SpecError(field, f"{path} is not callable")
    return obj


def check_kwargs(factory: Callable[..., Any], target: str, kwargs: Mapping[str, Any],
                 field: str, sources: Mapping[str, str] | None = None) -> None:
    """Refuse kwargs that `factory(**kwargs)` would reject, naming the first bad one.

    Skipped when the signature cannot be read (some builtins) or takes **kwargs (anything goes).
    `sources` maps a kwarg to the field it came from when kwargs were merged (e.g. data.eval_kwargs).
    """
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    params = signature.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    by_name = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in kwargs:
        if key not in by_name:
            where = (sources or {}).get(key, field)
            allowed = ", ".join(by_name) or "none"
            raise SpecError(f"{where}.{key}", f"not a parameter of {target} (allowed: {allowed})")
    missing = [p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               and p.name not in kwargs]
    if missing:
        raise SpecError(field, f"{target} needs {', '.join(missing)} (no default); give it in {field}")


def _brief(exc: BaseException, limit: int = 160) -> str:
    """The exception's message on one short line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
