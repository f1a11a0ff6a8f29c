"""The trainer's single handle on compression: it never branches on which techniques are on."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from launcher.compression.distill import DistillationLoss, TeacherAnnotator, build_teacher
from launcher.compression.prune import Pruner
from launcher.rundir import RunDir
from launcher.spec.schema import CompressionSpec
from strategies import Strategy

Batch = tuple[torch.Tensor, Any]


class Compression:
    def __init__(self, spec: CompressionSpec, device: torch.device) -> None:
        self.spec, self.device = spec, device
        self.pruner: Pruner | None = None
        self.annotate: Callable[[Batch], Batch] | None = None
        self.dense_eval: dict[str, float] | None = None

    def wrap_loss(self, task_loss: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """The training loss; with distillation this builds the teacher and returns the KD loss."""
        if self.spec.distill is None:
            return task_loss
        self.annotate = TeacherAnnotator(build_teacher(self.spec.distill.teacher, self.device), self.device)
        return DistillationLoss(self.spec.distill, task_loss)

    def attach(self, strategy: Strategy) -> None:
        if self.spec.prune is not None:
            self.pruner = Pruner(self.spec.prune, strategy.model_parts)

    def prepare_window(self, window: list[Batch]) -> list[Batch]:
        return [self.annotate(batch) for batch in window] if self.annotate else window

    def after_step(self, step: int, evaluate: Callable[[], dict[str, float]] | None) -> None:
        if self.pruner is None:
            return
        if not self.pruner.masks and evaluate is not None and self.pruner.is_event(step):
            self.dense_eval = evaluate()  # before the first masks: the baseline for the final accuracy
        self.pruner.after_step(step)

    def state_dict(self) -> dict[str, Any]:
        if self.pruner is None:
            return {}
        return {"prune_masks": self.pruner.state_dict(), "dense_eval": self.dense_eval}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.pruner is not None and "prune_masks" in state:
            self.pruner.load_state_dict(state["prune_masks"])
            self.dense_eval = state.get("dense_eval")  # measured before a resume, kept across it

    def describe(self, summary: dict[str, Any]) -> str | None:
        """One line for the log: the sparsity reached and the eval metrics before/after pruning."""
        if "pruning" not in summary:
            return None
        report = summary["pruning"]
        line = f"pruning: overall sparsity {report['sparsity']['overall']:.3f}"
        before = report["dense_eval"] or {}
        for key in ("eval_accuracy", "eval_loss"):
            if key in before and summary.get(key) is not None:
                line += f" | {key} {before[key]:.4f} before pruning -> {summary[key]:.4f}"
        return line

    def finish(self, run_dir: Path, rank: int) -> dict[str, Any]:
        """Summary entries; each rank also writes its mask digest so a test can compare them."""
        if self.pruner is None:
            return {}
        report = {"sparsity": self.pruner.sparsity(), "mask_digest": self.pruner.mask_digest(),
                  "dense_eval": self.dense_eval}
        RunDir(run_dir).prune_report(rank).write_text(json.dumps(report, indent=1))
        return {"pruning": report}
