"""Pipeline parallel: cut the model into stages at its layers and build a torch.distributed.pipelining schedule.

A rank's stages are views of one `owner` module that holds every parameter the rank keeps under
its whole-model name (so checkpoints, optimizer state and clipping see ordinary parameter names).
Each view shares the owner's submodules but keeps only its own layers; top-level modules
registered before the layer list belong to the first stage, those after it to the last, and the
others are set to None, so the model's forward must skip a module that is None (see
launcher/models.py). The layer list must be a direct child of the model.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from strategies.layout import MeshLayout, stage_block_ranges

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


class StageBlocks(nn.Module):
    """Some of `model.blocks`, registered under their original indices so names match the whole model."""

    def __init__(self, blocks: dict[int, nn.Module]) -> None:
        super().__init__()
        for index, block in blocks.items():
            self.add_module(str(index), block)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)


def _view(source: nn.Module, layers_name: str, blocks: nn.Module, blocks_kept: list[int], first: bool,
          last: bool) -> nn.Module:
    """A shallow copy of `source` sharing its submodules, with only `blocks_kept` and the ends it owns."""
    view = copy.copy(source)
    view._modules, view._parameters, view._buffers = dict(source._modules), dict(source._parameters), dict(source._buffers)
    names = list(source._modules)
    position = names.index(layers_name)
    setattr(view, layers_name, StageBlocks({i: blocks[i] for i in blocks_kept}))
    for name in names[:position] if not first else []:
        setattr(view, name, None)
    for name in names[position + 1:] if not last else []:
        setattr(view, name, None)
    return view


def pipeline_split(model: nn.Module, layout: MeshLayout, pp_rank: int,
                   layers_name: str = "blocks") -> tuple[nn.Module, list[nn.Module]]:
    """(owner, stage modules) of pipeline rank `pp_rank`; the stage modules share the owner's parameters."""
    if model._parameters or model._buffers:
        raise TypeError(f"{type(model).__name__} holds parameters or buffers directly on the root module; pipeline"
                        " parallel assigns whole submodules to stages, so move them into a submodule")
    blocks = model.get_submodule(layers_name)
    ranges = stage_block_ranges(len(blocks), layout.num_stages, layout.split_points, layers_name)
    local = layout.stage_indices(pp_rank)
    last = layout.num_stages - 1

    def view_of(source: nn.Module, stages: list[int]) -> nn.Module:
        kept = [i for s in stages for i in ranges[s]]
        return _view(source, layers_name, blocks, kept, first=0 in stages, last=last in stages)

    owner = view_of(model, local)
    stages = [view_of(owner, [s]) for s in local] if len(local) > 1 else [owner]
    return owner, stages


def build_schedule(layout: MeshLayout, stage_modules: list[nn.Module], pp_rank: int, device: torch.device,
                   group: torch.distributed.ProcessGroup, loss_fn: Callable | None, microbatches: int,
                   schedule: str | None = None):  # type: ignore[no-untyped-def]
    """The schedule over this rank's stages. Gradients are NOT scaled by the schedule: the loss
    function carries the 1/(microbatches x accumulation) factor, so a window of several
    `step` calls accumulates the gradient of the window's mean loss."""
    stages = [PipelineStage(module, index, layout.num_stages, device, group=group)
              for module, index in zip(stage_modules, layout.stage_indices(pp_rank))]
    cls = SCHEDULES[schedule or layout.schedule]
    if cls is ScheduleInterleaved1F1B:
        return cls(stages, microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages[0], microbatches, loss_fn=loss_fn, scale_grads=False)
