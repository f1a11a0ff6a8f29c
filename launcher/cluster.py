"""Cluster configs (`--cluster FILE`): WHERE a job runs, kept apart from the job spec (WHAT to train).

A cluster config names the executor and its settings and may set the spec's `resources` section:

    executor: local | ray | accelerate
    resources: {nodes: 1, procs_per_node: 2}   # merged into the spec, before --set overrides
    rdzv_endpoint: HOST:PORT                    # local, several nodes
    address: ray://... or http://...            # ray: an existing cluster
    accelerate_config: FILE                     # accelerate: the user's own config

Command-line flags win over the file, and the file's `resources` lose to `--set`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from launcher.errors import UserError
from launcher.spec.load import read_yaml_mapping
from launcher.spec.schema import ResourcesSpec, Section


class ClusterConfig(Section):
    executor: Literal["local", "ray", "accelerate"] = "local"
    resources: dict[str, Any] = {}
    rdzv_endpoint: str | None = None
    address: str | None = None
    accelerate_config: str | None = None


def load_cluster(path: str) -> ClusterConfig:
    raw = read_yaml_mapping(Path(path))
    config = _validate(path, ClusterConfig, raw, "")
    _validate(path, ResourcesSpec, config.resources, "resources.")  # the spec's own fields and ranges
    if config.accelerate_config is not None:  # relative to the cluster file, like an include
        config = config.model_copy(update={"accelerate_config": str(Path(path).parent / config.accelerate_config)})
    return config


def _validate(path: str, model: type[Section], raw: dict[str, Any], prefix: str) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = prefix + ".".join(str(p) for p in err["loc"])
        allowed = f"; allowed: {', '.join(model.model_fields)}" if err["type"] == "extra_forbidden" else ""
        raise UserError(f"{path}: {where}: {err['msg']}{allowed}") from None


def resource_overrides(config: ClusterConfig) -> list[str]:
    """The file's resources as `--set` overrides, so the spec validates them like any other."""
    return [f"resources.{key}={value}" for key, value in config.resources.items()]
