"""`meshyard env`: what a bug report needs about this machine, in one paste-able block.

Like `accelerate env` and `python -m torch.utils.collect_env`: versions of python, torch and the
optional engines, devices and the distributed backends torch was built with, CPU cores and memory,
and the environment variables that change how a run behaves. Nothing is imported that is not
installed, and nothing is started.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
from typing import Any

import psutil

PACKAGES = ("torch", "ray", "accelerate", "deepspeed", "transformers", "torchao", "pydantic", "meshyard")
# Variables that change a run: threads, allocator, collectives, torch's own switches, meshyard's.
RELEVANT = re.compile(r"^(OMP_|MKL_|MALLOC_|NCCL_|GLOO_|TORCH_|TORCHELASTIC_|CUDA_VISIBLE|PYTORCH_|MASTER_|"
                      r"WORLD_SIZE$|RANK$|LOCAL_RANK$|MESHYARD_|RAY_ADDRESS$)")
SECRET = re.compile(r"TOKEN|SECRET|PASSWORD|KEY", re.IGNORECASE)


def collect() -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "cuda": {"available": cuda, "built_with": torch.version.cuda,
                 "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []},
        "backends": {name: available() for name, available in (
            ("gloo", dist.is_gloo_available), ("nccl", dist.is_nccl_available), ("mpi", dist.is_mpi_available))},
        "cpu_cores": {"logical": psutil.cpu_count(logical=True), "physical": psutil.cpu_count(logical=False),
                      "usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None},
        "memory_bytes": {"total": psutil.virtual_memory().total, "available": psutil.virtual_memory().available},
        "environment": {key: ("<hidden>" if SECRET.search(key) else value)
                        for key, value in sorted(os.environ.items()) if RELEVANT.match(key)},
    }


def render(info: dict[str, Any]) -> str:
    gib = 1024**3
    lines = [f"- python: {info['python']} ({info['platform']})"]
    lines += [f"- {name}: {version or 'not installed'}" for name, version in info["packages"].items()]
    cuda = info["cuda"]
    lines.append(f"- CUDA: {'available' if cuda['available'] else 'not available'} (torch built with"
                 f" {cuda['built_with'] or 'no CUDA'}){': ' + ', '.join(cuda['devices']) if cuda['devices'] else ''}")
    lines.append("- distributed backends: " + ", ".join(name for name, ok in info["backends"].items() if ok))
    cores = info["cpu_cores"]
    lines.append(f"- CPU cores: {cores['usable']} usable of {cores['logical']} logical ({cores['physical']} physical)")
    memory = info["memory_bytes"]
    lines.append(f"- memory: {memory['total'] / gib:.1f} GiB ({memory['available'] / gib:.1f} GiB available)")
    lines.append("- environment: " + (", ".join(f"{k}={v}" for k, v in info["environment"].items()) or "(none set)"))
    return "\n".join(lines)
