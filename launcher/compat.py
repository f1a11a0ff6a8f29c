"""Refuse, before any process starts, to resume from a checkpoint that does not fit the spec's model.

The model is built on the meta device (no memory, no init cost) and its parameter shapes are
compared with the tensor shapes recorded in the checkpoint's DCP metadata. First the checkpoint must
be loadable at all (launcher.checkpoint.check_loadable): files matching the manifest's sizes and
SHA-256, and metadata, non-tensor entries and rank files readable without running code
(launcher.safe_dcp), so a tampered or damaged checkpoint is one line here, before any rank starts.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from launcher.checkpoint import check_loadable, read_manifest
from launcher.components import model_factory
from launcher.errors import UserError
from launcher.safe_dcp import read_metadata_file
from launcher.spec.schema import JobSpec


def check_checkpoint_fits(spec: JobSpec, checkpoint: Path, world_size: int) -> None:
    keep = "the checkpoints were left untouched; start fresh with another name or output.dir"
    check_loadable(checkpoint)  # CheckpointRefused is a UserError: one line naming the file
    manifest = read_manifest(checkpoint)
    written_by_deepspeed = manifest["format"] == "deepspeed"
    if written_by_deepspeed != (spec.strategy.name == "deepspeed"):
        raise UserError(f"{checkpoint}: was written by {'DeepSpeed' if written_by_deepspeed else 'DCP'}, which"
                        f" strategy {spec.strategy.name} cannot resume from; {keep}")
    if written_by_deepspeed:
        saved_world = manifest["world_size"]
        if saved_world != world_size:
            raise UserError(f"{checkpoint}: a DeepSpeed checkpoint from {saved_world} processes resumes only at the"
                            f" same world size, not {world_size}; {keep}")
        return  # DeepSpeed checks its own tensors when it loads them
    saved = {
        key.removeprefix("model."): tuple(meta.size)
        for key, meta in read_metadata_file(checkpoint / ".metadata").state_dict_metadata.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    with torch.device("meta"):
        model = model_factory(spec.model)()
    wanted = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    for key, shape in wanted.items():
        if key not in saved:
            raise UserError(f"{checkpoint}: has no tensor {key!r} that the spec's model needs; {keep}")
        if saved[key] != shape:
            raise UserError(f"{checkpoint}: {key} is {list(saved[key])} there but {list(shape)} in the spec's model;"
                            f" {keep}")
    extra = sorted(set(saved) - set(wanted))
    if extra:
        raise UserError(f"{checkpoint}: holds {extra[0]!r} (+{len(extra) - 1} more) that the spec's model lacks;"
                        f" {keep}")
