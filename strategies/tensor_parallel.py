"""Tensor parallel: shard the layers a plan names over the tensor axis of the mesh (DTensor).

A plan maps module paths (fnmatch patterns such as `blocks.*.fc1`) to `colwise` or `rowwise`. It
comes from the spec (`parallel.tp_plan`) or from the model's `tp_plan` attribute. Column-wise
layers take a replicated input and keep their output sharded on the last dim; the row-wise layer
after them takes that shard and all-reduces its output, so the rest of the model sees whole tensors.
"""
from __future__ import annotations

from collections.abc import Mapping
from fnmatch import fnmatch

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}


def resolve_tp_plan(model: nn.Module, spec_plan: Mapping[str, str] | None) -> dict[str, str]:
    plan = spec_plan if spec_plan is not None else getattr(model, "tp_plan", None)
    if not plan:
        raise ValueError(f"{type(model).__name__} declares no tp_plan; give parallel.tp_plan")
    return dict(plan)


def tp_targets(model: nn.Module, plan: dict[str, str]) -> dict[str, str]:
    """Module name -> style for every submodule a plan pattern matches (the last matching pattern wins)."""
    return {name: style for name, _ in model.named_modules()
            for pattern, style in plan.items() if name and fnmatch(name, pattern)}


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, str]) -> nn.Module:
    """Parallelize every submodule of `model` matched by `plan` (modules of other pipeline stages are
    simply absent, so patterns are matched here rather than handed to torch as paths)."""
    targets = tp_targets(model, plan)
    if not targets:
        return model
    return parallelize_module(model, tp_mesh, {name: STYLES[style]() for name, style in targets.items()})
