"""`meshyard export RUN`: one consolidated state dict from a (possibly sharded) DCP checkpoint.

DCP reassembles shards from any world size into a plain module in a process with no process group,
so nothing is gathered to a rank 0 during training.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from launcher.atomic import atomic_target
from launcher.checkpoint import find_latest, load_model_weights
from launcher.components import model_factory
from launcher.errors import UserError
from launcher.spec import JobSpec, spec_from_json_file


def load_run_model(run_dir: Path) -> tuple[JobSpec, nn.Module, Path]:
    """(spec, fp32 model in eval mode with the newest checkpoint's weights, that checkpoint)."""
    if not (run_dir / "spec.json").is_file():
        raise UserError(f"{run_dir}: not a meshyard run directory (no spec.json)")
    checkpoint = find_latest(run_dir / "checkpoints")
    if checkpoint is None:
        raise UserError(f"{run_dir}: has no complete checkpoint; train it first")
    spec = spec_from_json_file(run_dir / "spec.json")
    model = load_model_weights(model_factory(spec.model)(), checkpoint)
    return spec, model.eval(), checkpoint


def export_run(run_dir: Path, out: Path | None) -> Path:
    """Write the consolidated model state dict (torch.save; load with weights_only=True)."""
    _, model, _ = load_run_model(run_dir)
    out = out or run_dir / "export" / "model.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(out) as tmp:
        torch.save(model.state_dict(), tmp)
    return out
