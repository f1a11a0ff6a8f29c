"""DeepSpeed's own checkpoints inside the loop's step directories, read without unpickling code.

DeepSpeed's readers (`TorchCheckpointEngine.load`, `zero_to_fp32`) call
`torch.load(weights_only=False)`, which runs whatever a checkpoint file's pickle says. Here every
file goes through `torch.load(weights_only=True)` with exactly DeepSpeed's three plain data classes
allowed (found in its optimizer files at every stage, fp32 and bf16): the engine gets a checkpoint
engine that loads that way, and export consolidates the ZeRO partitions itself.
"""
from __future__ import annotations

import math
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from strategies.deepspeed_engine import DeepSpeedStrategy

CHECKPOINT_TAG = "deepspeed"  # the engine's sub-directory inside one of our step directories
MapLocation = str | torch.device | Callable[..., Any] | None


class UnreadableCheckpoint(Exception):
    """A DeepSpeed checkpoint file this code refuses to read; the message is one line for the user."""


# The only non-tensor classes DeepSpeed's files may name (by import path: checked without importing DeepSpeed).
DEEPSPEED_DATA_CLASSES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                          "deepspeed.runtime.zero.config.ZeroStageEnum",
                          "deepspeed.utils.tensor_fragment.fragment_address")


def _deepspeed_data_classes() -> list[Any]:
    import importlib

    return [getattr(importlib.import_module(module), name)
            for module, name in (path.rsplit(".", 1) for path in DEEPSPEED_DATA_CLASSES)]


def check_pickled_globals(path: Path) -> None:
    """Refuse a file whose pickle names anything but weights-only types and DeepSpeed's data classes.
    Reads the pickle only, no tensor data: cheap enough for the launcher to check every file first."""
    try:
        extra = sorted(_unsafe_globals(path) - set(DEEPSPEED_DATA_CLASSES))
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise UnreadableCheckpoint(f"{path}: refused to load, its pickle cannot be read safely ({exc})") from None
    if extra:
        raise UnreadableCheckpoint(f"{path}: refused to load, it holds {', '.join(extra)}"
                                   " (DeepSpeed checkpoints are read with weights_only=True)")


def _unsafe_globals(path: Path) -> set[str]:
    """The globals a torch.save file's pickle names that weights_only does not allow, without running it.

    torch's public reader (`get_unsafe_globals_in_checkpoint`) takes the zip format only; DeepSpeed
    writes the legacy one (magic number, protocol, system info, then the object's pickle, then raw
    storages). For that, the same private scanner and allowlist torch's reader uses: torch 2.13 has no
    public name for either."""
    from torch import _weights_only_unpickler as scanner

    if zipfile.is_zipfile(path):
        return set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    with path.open("rb") as f:
        for _header in range(3):
            scanner.get_globals_in_pkl(f)
        named = scanner.get_globals_in_pkl(f)
    return named - set(scanner._get_allowed_globals()) - set(scanner._get_user_allowed_globals())


def load_weights_only(path: str | Path, map_location: MapLocation = "cpu") -> Any:
    """torch.load with weights_only=True, allowing DeepSpeed's data classes and nothing else."""
    allowed = _deepspeed_data_classes()
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            check_pickled_globals(Path(path))
            raise UnreadableCheckpoint(f"{path}: refused to load, it holds a non-tensor object"
                                       " (DeepSpeed checkpoints are read with weights_only=True)") from None


def weights_only_checkpoint_engine() -> Any:
    """DeepSpeed's torch checkpoint engine with `load` replaced by `load_weights_only`."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: MapLocation = None) -> Any:
            return load_weights_only(path, map_location)

    return WeightsOnlyCheckpointEngine()


class DeepSpeedCheckpoint:
    """The engine's own checkpoint inside one of the loop's step directories (format `deepspeed`)."""

    format = CHECKPOINT_TAG

    def __init__(self, strategy: DeepSpeedStrategy) -> None:
        self.strategy = strategy

    def save(self, path: Path) -> None:
        self.strategy.engine.save_checkpoint(str(path), tag=CHECKPOINT_TAG, save_latest=False)

    def load(self, path: Path) -> None:
        loaded, _ = self.strategy.engine.load_checkpoint(str(path), tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                                         load_lr_scheduler_states=False)
        if loaded is None:
            raise FileNotFoundError(f"{path}: no DeepSpeed checkpoint under {CHECKPOINT_TAG}/")


def consolidated_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """fp32 model weights (and buffers) from one of our DeepSpeed checkpoints, without a process group.

    Stage 0 keeps whole weights in the model file. From ZeRO-1 on the fp32 master weights are
    partitions in each rank's optimizer file; they are put back together the way DeepSpeed cut them.
    """
    engine_dir = path / CHECKPOINT_TAG
    optim_files = sorted(engine_dir.glob("*optim_states.pt"), key=_rank_of)
    if not optim_files:  # stage 0
        model_states = load_weights_only(engine_dir / "mp_rank_00_model_states.pt")
        return {key: value.float() for key, value in model_states["module"].items()}
    model_states = load_weights_only(min(engine_dir.glob("*model_states.pt"), key=_rank_of))
    if model_states.get("frozen_param_shapes"):
        raise UnreadableCheckpoint(f"{engine_dir}: exporting parameters with requires_grad=False from a ZeRO"
                                   " checkpoint is not supported")
    partitions = [load_weights_only(f)["optimizer_state_dict"] for f in optim_files]
    if int(partitions[0]["zero_stage"]) == 3:
        params = _merge_stage3(model_states["param_shapes"], [p["fp32_flat_groups"] for p in partitions])
    else:
        params = _merge_stage1_2(model_states["param_shapes"], partitions)
    buffers = {name: value.float() if value.is_floating_point() else value
               for name, value in model_states["module"].items() if name in model_states["buffer_names"]}
    state = {**buffers, **params}
    for alias, name in model_states["shared_params"].items():  # tied weights are stored once
        state[alias] = state[name]
    return state


def _rank_of(file: Path) -> int:
    """zero_pp_rank_<r>_mp_rank_00_*.pt -> r (names sort 0, 1, 10, 2 as strings)."""
    parts = file.name.split("_")
    return int(parts[parts.index("pp") + 2]) if "pp" in parts else 0


def _merge_stage1_2(shapes: list[dict[str, torch.Size]], partitions: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stages 1-2: each parameter group is one flat fp32 vector cut into equal consecutive slices,
    one per rank; parameters lie in it in order, each followed by its alignment padding."""
    state: dict[str, torch.Tensor] = {}
    paddings = partitions[0].get("param_alignment_paddings")
    for group, group_shapes in enumerate(shapes):
        flat = torch.cat([p["single_partition_of_fp32_groups"][group] for p in partitions])
        offset = 0
        for index, (name, shape) in enumerate(group_shapes.items()):
            numel = math.prod(shape)
            state[name] = flat.narrow(0, offset, numel).view(shape).clone()
            offset += numel + (paddings[group][index] if paddings else 0)
    return state


def _merge_stage3(shapes: list[dict[str, torch.Size]],
                  flat_groups: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stage 3: every parameter is cut into ceil(numel / world) elements per rank (the last rank's
    slice padded); each rank's flat groups hold its slices of all parameters in order."""
    world = len(flat_groups)
    per_rank = [torch.cat(groups) for groups in flat_groups]
    state: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in (item for group in shapes for item in group.items()):
        numel = math.prod(shape)
        part = math.ceil(numel / world)
        whole = torch.cat([flat.narrow(0, offset, part) for flat in per_rank])
        state[name] = whole[:numel].view(shape).clone()
        offset += part
    return state
