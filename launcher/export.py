"""`meshyard export RUN`: one consolidated state dict from a (possibly sharded) DCP checkpoint.

DCP reassembles shards from any world size into a plain module in a process with no process group,
so nothing is gathered to a rank 0 during training.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from launcher.atomic import atomic_target
from launcher.checkpoint import find_latest, load_model_weights
from launcher.components import model_factory
from launcher.errors import UserError
from launcher.rundir import RunDir
from launcher.spec import JobSpec, spec_from_json_file


def load_run_model(run_dir: Path) -> tuple[JobSpec, nn.Module, Path]:
    """(spec, fp32 model in eval mode with the newest checkpoint's weights, that checkpoint)."""
    files = RunDir(run_dir)
    if not files.spec.is_file():
        raise UserError(f"{run_dir}: not a meshyard run directory (no spec.json)")
    checkpoint = find_latest(files.checkpoints)
    if checkpoint is None:
        raise UserError(f"{run_dir}: has no complete checkpoint; train it first")
    spec = spec_from_json_file(files.spec)
    model = load_model_weights(model_factory(spec.model)(), checkpoint)
    return spec, model.eval(), checkpoint


def export_run(run_dir: Path, out: Path | None, fmt: str = "torch") -> Path:
    """Write the consolidated model: a torch state dict file (load with weights_only=True), or a
    safetensors directory (a Hugging Face model's save_pretrained: config.json + model.safetensors,
    which `from_pretrained` loads; other models: model.safetensors alone)."""
    _, model, _ = load_run_model(run_dir)
    if fmt == "safetensors":
        return _export_safetensors(model, out or RunDir(run_dir).export / "safetensors")
    out = out or RunDir(run_dir).export / "model.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(out) as tmp:
        torch.save(model.state_dict(), tmp)
    return out


def _export_safetensors(model: nn.Module, out: Path) -> Path:
    """Written under a temporary name and renamed, so `out` is complete or absent."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory (safetensors exports a directory)")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".partial-{out.name}-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        if hasattr(model, "save_pretrained"):
            # keeps tied weights tied (Module.__getattr__ is typed Tensor | Module: hence the ignore)
            model.save_pretrained(partial, safe_serialization=True)  # type: ignore[operator]
        else:
            from safetensors.torch import save_model

            partial.mkdir()
            save_model(model, str(partial / "model.safetensors"))  # stores each tied tensor once
        shutil.rmtree(out, ignore_errors=True)
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out
