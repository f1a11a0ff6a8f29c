"""DeepSpeed's JSON config, written from the job spec so the engine and the loop agree.

The spec owns batch identity, accumulation, clipping, precision and the ZeRO stage; the loop owns
the optimizer and the LR schedule (it hands DeepSpeed a torch optimizer). A user's DeepSpeed JSON
(`strategy.config`) may add any other setting (bucket sizes, overlap, ...); setting one of ours to a
different value is an error that names both sources, because silently preferring either side would
train something other than what one of the two files says.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launcher.errors import PlanError
from launcher.spec.schema import JobSpec

# Sections DeepSpeed would build itself, replacing the spec's optimizer, schedule or precision, or
# its checkpoint engine (meshyard writes the engine's checkpoints and reads them with weights_only=True).
OWNED_BY_SPEC = {
    "optimizer": "optimizer",
    "scheduler": "schedule",
    "fp16": "training.precision",
    "amp": "training.precision",
    "checkpoint": "checkpoint",
}
# Where each value we write comes from, for error messages.
SOURCES = {
    "train_micro_batch_size_per_gpu": "data.micro_batch_size",
    "gradient_accumulation_steps": "training.grad_accum_steps",
    "train_batch_size": "the global batch (micro-batch x accumulation x data-parallel)",
    "gradient_clipping": "optimizer.grad_clip",
    "bf16.enabled": "training.precision",
    "zero_optimization.stage": "strategy.stage",
    "zero_optimization.offload_optimizer.device": "strategy.offload_optimizer",
}


def deepspeed_config(spec: JobSpec, dp_size: int) -> dict[str, Any]:
    """The engine's config: the spec's values, merged with the user's JSON if given."""
    micro, accum = spec.data.micro_batch_size, spec.training.grad_accum_steps
    zero: dict[str, Any] = {"stage": spec.strategy.stage}
    offload = spec.strategy.offload_optimizer == "cpu"
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    ours: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * dp_size,
        "gradient_clipping": spec.optimizer.grad_clip or 0.0,
        "bf16": {"enabled": spec.training.precision == "bf16"},
        "zero_optimization": zero,
        # The optimizer is the spec's torch optimizer; DeepSpeed only vouches for its own at ZeRO >= 1.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # the loop logs; keep DeepSpeed's per-step prints off
    }
    if offload:
        # The offloaded step runs the spec's torch optimizer on the CPU copy; DeepSpeed would otherwise
        # insist on its own DeepSpeedCPUAdam (Adam only, and a JIT-compiled op).
        ours["zero_force_ds_cpu_optimizer"] = False
    if spec.strategy.config is None:
        return ours
    return merge_user_config(ours, _read_user_config(spec.strategy.config))


def merge_user_config(ours: dict[str, Any], user: dict[str, Any], *, source: str = "strategy.config") -> dict[str, Any]:
    for key in user:
        if key in OWNED_BY_SPEC:
            raise PlanError(f"{source}: {key!r} is set by the job spec ({OWNED_BY_SPEC[key]}); remove it from the"
                            " DeepSpeed JSON")
    return _merge(ours, user, "", source)


def _merge(ours: dict[str, Any], user: dict[str, Any], prefix: str, source: str) -> dict[str, Any]:
    merged = dict(ours)
    for key, value in user.items():
        path = f"{prefix}{key}"
        if key not in ours:
            merged[key] = value
        elif value == "auto":  # Hugging Face style: "fill this in from the job"
            continue
        elif isinstance(ours[key], dict) and isinstance(value, dict):
            merged[key] = _merge(ours[key], value, path + ".", source)
        elif ours[key] != value:
            raise PlanError(f"{source}: {path}={json.dumps(value)} conflicts with {path}={json.dumps(ours[key])}"
                            f" from the job spec ({SOURCES.get(path, path)}); change one of the two")
    return merged


def _read_user_config(path: str) -> dict[str, Any]:
    try:
        user = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PlanError(f"strategy.config={path}: no such file") from None
    except (OSError, json.JSONDecodeError) as err:
        raise PlanError(f"strategy.config={path}: not a readable JSON file ({err})") from None
    if not isinstance(user, dict):
        raise PlanError(f"strategy.config={path}: must hold a JSON object")
    return user
