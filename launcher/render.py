"""`meshyard render KIND SPEC`: the files that run a job elsewhere, rendered from the spec (pure).

- slurm: an sbatch script; srun starts one `meshyard launch` per node, which runs torchrun with a
  c10d rendezvous on the first node of the allocation.
- rayjob: a KubeRay RayJob manifest whose entrypoint is `meshyard launch SPEC --executor ray`.
- accelerate: the accelerate config file the accelerate executor would generate.
"""
from __future__ import annotations

import re
import shlex

import yaml

from launcher.plan import Plan

RDZV_PORT = 29500
RAY_VERSION = "2.60.0"
DEFAULT_IMAGE = "meshyard:0.1.0"  # an image with this project installed (see README: Clusters)


def launch_args(spec_file: str, overrides: list[str]) -> list[str]:
    return [spec_file, *[part for o in overrides for part in ("--set", o)]]


def render_slurm(name: str, plan: Plan, spec_file: str, overrides: list[str]) -> str:
    gpus = [f"#SBATCH --gpus-per-node={plan.procs_per_node}"] if plan.device == "cuda" else []
    launch = shlex.join(["meshyard", "launch", *launch_args(spec_file, overrides), "--nnodes", str(plan.nodes)])
    return "\n".join([
        "#!/bin/bash",
        f"# Rendered by `meshyard render slurm {spec_file}`: {plan.nodes} node(s) x {plan.procs_per_node} process(es).",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={plan.nodes}",
        "#SBATCH --ntasks-per-node=1  # one meshyard launcher (torchrun agent) per node",
        f"#SBATCH --cpus-per-task={max(2, plan.procs_per_node)}",
        *gpus,
        "#SBATCH --output=%x-%j.out",
        "set -euo pipefail",
        "",
        "# Every node's launcher meets at a c10d rendezvous on the allocation's first node.",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export MESHYARD_RDZV_ENDPOINT=\"$head_node:${{MESHYARD_RDZV_PORT:-{RDZV_PORT}}}\"",
        "",
        "# Single quotes: each task expands its own SLURM_NODEID.",
        f"srun --kill-on-bad-exit=1 bash -c '{launch} --node-rank \"$SLURM_NODEID\""
        " --rdzv-endpoint \"$MESHYARD_RDZV_ENDPOINT\"'",
        "",
    ])


def render_rayjob(name: str, plan: Plan, spec_file: str, overrides: list[str], image: str = DEFAULT_IMAGE) -> str:
    gpu = {"nvidia.com/gpu": plan.procs_per_node} if plan.device == "cuda" else {}
    worker_limits = {"cpu": str(plan.procs_per_node + 1), "memory": "8Gi", **gpu}
    manifest = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": re.sub(r"[^a-z0-9-]", "-", name.lower())},
        "spec": {
            "entrypoint": shlex.join(["meshyard", "launch", *launch_args(spec_file, overrides), "--executor", "ray"]),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0"},  # the head schedules no training workers
                    "template": {"spec": {"containers": [{
                        "name": "ray-head", "image": image,
                        "resources": {"limits": {"cpu": "2", "memory": "4Gi"}},
                    }]}},
                },
                "workerGroupSpecs": [{
                    "groupName": "train", "replicas": plan.nodes, "minReplicas": plan.nodes, "maxReplicas": plan.nodes,
                    "rayStartParams": {"num-cpus": str(plan.procs_per_node)},
                    "template": {"spec": {"containers": [{
                        "name": "ray-worker", "image": image, "resources": {"limits": worker_limits},
                    }]}},
                }],
            },
        },
    }
    header = f"# Rendered by `meshyard render rayjob {spec_file}`: kubectl apply -f this file (KubeRay operator).\n"
    return header + yaml.safe_dump(manifest, sort_keys=False)


def render_accelerate(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False)
