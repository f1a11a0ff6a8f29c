"""What every rank does once its process exists: check the world it was started into, join the
process group, train. Every executor ends here: torchrun and `accelerate launch` through
launcher/worker.py, Ray Train's workers through launcher/executors/ray_rank.py.
"""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from launcher.heartbeat import Heartbeat
from launcher.imports import ensure_cwd_importable
from launcher.interrupts import PreemptionFlag
from launcher.plan import plan_from_json
from launcher.rundir import RunDir
from launcher.spec import spec_from_json_file
from launcher.startup import StartupClock
from launcher.trainer import CheckpointExchange, RankInfo, train


def rank_info_from_env() -> RankInfo:
    return RankInfo(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        attempt=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
    )


def init_process_group(backend: str, ranks: RankInfo, timeout: timedelta) -> None:
    """Join the job's process group through torchrun's environment contract.

    Under torchrun the agent's store outlives a restart of the worker group, and torch 2.13 does not
    namespace it by attempt: a restarted group read the dead group's gloo addresses and hung or got
    "Connection refused". Keys are therefore namespaced by TORCHELASTIC_RESTART_COUNT here.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend, timeout=timeout)
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), ranks.world_size,
                          is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"meshyard/attempt_{attempt}", store),
                            rank=ranks.rank, world_size=ranks.world_size, timeout=timeout)


def run_rank(spec_path: Path, clock: StartupClock, exchange: CheckpointExchange = CheckpointExchange(),
             preemption: PreemptionFlag | None = None, heartbeat: Heartbeat | None = None) -> dict:
    """Check the world, join the process group, train; the summary.

    Ray Train has already formed the process group when it calls this (and exchanges checkpoints
    with the loop); other executors have not. `preemption` and `heartbeat` come from the caller when
    it installed them before importing this module (launcher/worker.py).
    """
    ensure_cwd_importable()
    spec = spec_from_json_file(spec_path)
    plan = plan_from_json(RunDir(spec_path.parent).plan.read_text())  # the launcher's, as `meshyard plan` printed it
    ranks = rank_info_from_env()
    if ranks.world_size != plan.world_size:
        # Some launchers silently start one process, or several independent ones: refuse to train.
        raise RuntimeError(
            f"rank {ranks.rank} sees WORLD_SIZE={ranks.world_size}, but the plan needs {plan.world_size}"
            " processes: the executor started the wrong number of processes"
        )
    preemption = preemption or PreemptionFlag().install()  # SIGTERM: checkpoint at the next step boundary
    joined_here = plan.strategy != "single" and not dist.is_initialized()
    if joined_here:
        if heartbeat is not None:
            heartbeat.update(0, "setup:process_group")
        init_process_group(plan.backend, ranks, timedelta(seconds=spec.training.collective_timeout_s))
    clock.mark("pg_init")
    try:
        return train(spec, plan, spec_path.parent, ranks, preemption, clock, exchange, heartbeat)
    finally:
        if joined_here and dist.is_initialized():
            dist.destroy_process_group()


def format_summary(summary: dict) -> str:
    verb = "preempted" if summary.get("preempted") else "done"
    parts = [f"{verb}: {summary['steps']}/{summary['max_steps']} steps in {summary['wall_s']:.1f} s"]
    for key in ("final_loss", "eval_loss"):
        if summary.get(key) is not None:
            parts.append(f"{key.replace('_', ' ')} {summary[key]:.5f}")
    for key, unit in (("samples_per_s", "samples/s"), ("tokens_per_s", "tokens/s")):
        if summary.get(key) is not None:
            parts.append(f"{summary[key]:.0f} {unit}")
    if summary.get("mfu") is not None:
        parts.append(f"MFU {100 * summary['mfu']:.1f}%")
    parts.append(f"checkpoint {summary['checkpoint']}")
    return " | ".join(parts)
