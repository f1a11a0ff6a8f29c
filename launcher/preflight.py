"""Checks made before anything is started: factory kwargs, a usable run directory, a training set
that holds at least one global batch.

Each would otherwise surface late: a misspelt kwarg as a TypeError in every rank, an unusable
`output.dir` as an OSError traceback from the first mkdir, a small dataset as a ValueError traceback
from every rank's sampler. Here each is one SpecError (exit 2).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from launcher.errors import SpecError
from launcher.imports import check_kwargs, resolve
from launcher.plan import Plan
from launcher.spec.schema import JobSpec

ROOM_FOR_RUN_FILES = 200  # characters below the run directory (checkpoints/step_.../__0_0.distcp.<pid>.tmp)


def check_component_kwargs(spec: JobSpec) -> None:
    """Every factory's kwargs bind to its signature, as `factory(**kwargs)` will be called."""
    check_kwargs(resolve(spec.model.target, "model.target"), spec.model.target, spec.model.kwargs, "model.kwargs")
    data = resolve(spec.data.target, "data.target")
    check_kwargs(data, spec.data.target, spec.data.kwargs, "data.kwargs")
    if spec.data.eval_kwargs is not None:
        merged = {**spec.data.kwargs, **spec.data.eval_kwargs}
        check_kwargs(data, spec.data.target, merged, "data.kwargs",
                     {k: "data.eval_kwargs" for k in spec.data.eval_kwargs})
    teacher = spec.compression.distill.teacher if spec.compression.distill is not None else None
    if teacher is not None and teacher.target is not None:
        field = "compression.distill.teacher"
        check_kwargs(resolve(teacher.target, f"{field}.target"), teacher.target, teacher.kwargs, f"{field}.kwargs")


def check_training_set(spec: JobSpec, plan: Plan) -> Any:
    """The training set holds one global batch. Builds it once here (datasets are usually lazy: a
    file list, a tensor), so its factory's own errors are one line too; returns it (the plan's
    estimate traces its first samples)."""
    try:
        train = resolve(spec.data.target, "data.target")(**spec.data.kwargs)
        size = len(train)
    except SpecError:
        raise
    except Exception as exc:  # the user's factory: its message, without our traceback around it
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise SpecError("data.target",
                        f"{spec.data.target}(**data.kwargs) failed: {type(exc).__name__}: {first_line}") from None
    if size < plan.global_batch_size:
        raise SpecError("data", f"the training set has {size} items, fewer than one global batch of"
                                f" {plan.global_batch_size} (`meshyard plan` shows how it is made up); lower"
                                " data.micro_batch_size or training.grad_accum_steps")
    return train


def check_run_dir(output_dir: str, run_dir: Path) -> None:
    """`run_dir` (<output.dir>/<name>) can be created and written: short enough, no file in the way, writable."""
    name_max, path_max = _limits(run_dir)
    long_part = next((part for part in run_dir.parts if len(part.encode()) > name_max), None)
    if long_part is not None:
        raise SpecError("output.dir", f"a path component is longer than {name_max} bytes ({long_part[:40]}...)")
    if len(str(run_dir).encode()) + ROOM_FOR_RUN_FILES > path_max:
        raise SpecError("output.dir", f"the run directory's path is {len(str(run_dir))} characters; the files"
                                      f" in it need it under {path_max - ROOM_FOR_RUN_FILES}")
    try:
        existing = _nearest_existing(run_dir)
    except OSError as exc:
        raise SpecError("output.dir", f"cannot look at {exc.filename or run_dir}: {exc.strerror}") from None
    if not existing.is_dir():
        raise SpecError("output.dir", f"{existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "the run directory" if existing == run_dir else f"{existing} (where the run directory goes)"
        raise SpecError("output.dir", f"{what} is not writable")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _limits(path: Path) -> tuple[int, int]:
    """NAME_MAX and PATH_MAX of the filesystem (255 and 4096 when it will not say)."""
    for candidate in (path, *path.parents):
        try:
            return os.pathconf(candidate, "PC_NAME_MAX"), os.pathconf(candidate, "PC_PATH_MAX")
        except (OSError, ValueError):
            continue
    return 255, 4096
