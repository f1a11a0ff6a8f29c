"""Knowledge distillation: a frozen teacher's logits ride along with each micro-batch's targets.

The teacher runs in the trainer (eval mode, no gradients, on every data-parallel rank for its own
micro-batches), so strategies stay unaware of distillation: they only see a loss function whose
target is a (labels, teacher_logits) pair.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from launcher.checkpoint import check_loadable, find_latest, is_complete, load_model_weights
from launcher.components import model_factory
from launcher.errors import UserError
from launcher.rundir import RunDir
from launcher.spec.schema import ComponentSpec, DistillSpec, TeacherSpec

TaskLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def teacher_checkpoint(spec: TeacherSpec) -> Path | None:
    """The teacher's checkpoint directory, or a UserError if the spec names one that is not there,
    is damaged, or holds anything that would run code when read (checked in the launcher before any
    rank starts, and again in each rank: cheap there, see launcher.checkpoint)."""
    if spec.checkpoint is None:
        return None
    path = Path(spec.checkpoint)
    found = path if is_complete(path) else find_latest(RunDir(path).checkpoints)
    if found is None:
        raise UserError(f"compression.distill.teacher.checkpoint={spec.checkpoint}: no complete checkpoint there"
                        " (give a meshyard run directory or one of its checkpoints/step_* directories)")
    check_loadable(found)
    return found


def teacher_component(spec: TeacherSpec, checkpoint: Path | None) -> ComponentSpec:
    """The teacher's architecture: the spec's target, else the one recorded in the teacher's run."""
    if spec.target is not None:
        return ComponentSpec(target=spec.target, kwargs=spec.kwargs)
    from launcher.spec import spec_from_json_file

    assert checkpoint is not None  # TeacherSpec: a target, a checkpoint or both
    return spec_from_json_file(RunDir.of_checkpoint(checkpoint).spec).model


def build_teacher(spec: TeacherSpec, device: torch.device) -> nn.Module:
    checkpoint = teacher_checkpoint(spec)
    teacher = model_factory(teacher_component(spec, checkpoint))()
    if checkpoint is not None:
        load_model_weights(teacher, checkpoint)
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class DistillationLoss:
    """alpha * KL(teacher/T || student/T) * T^2 + (1 - alpha) * task loss; plain targets -> task loss."""

    def __init__(self, spec: DistillSpec, task_loss: TaskLoss) -> None:
        self.temperature, self.alpha, self.task_loss = spec.temperature, spec.alpha, task_loss

    def __call__(self, output: torch.Tensor, target: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if not isinstance(target, (tuple, list)):
            return self.task_loss(output, target)
        labels, teacher_logits = target
        t = self.temperature
        soft = F.kl_div(F.log_softmax(output / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1),
                        log_target=True, reduction="batchmean") * t * t
        return self.alpha * soft + (1 - self.alpha) * self.task_loss(output, labels)


class TeacherAnnotator:
    """Turns (inputs, labels) micro-batches into (inputs, (labels, teacher_logits))."""

    def __init__(self, teacher: nn.Module, device: torch.device) -> None:
        self.teacher, self.device = teacher, device

    @torch.no_grad()
    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor]
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        inputs, labels = batch
        return inputs, (labels, self.teacher(inputs.to(self.device)))
