"""What each Ray Train worker runs: the same per-rank code as every other executor.

Ray's torch backend has already set torchrun's environment contract (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and formed the process group; `run_rank` checks the world
size against the plan and trains. Checkpoints go through Ray: as each one is complete every rank
calls `ray.train.report`, rank 0 with the checkpoint directory, which Ray copies into its storage;
a restarted worker group (FailureConfig) gets the newest registered one back from
`ray.train.get_checkpoint()` and resumes from it, or from a newer one in the run directory
(checkpoint.resume: auto; see launcher.trainer.resume_path).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from launcher.executors.ray_output import rank_console
from launcher.startup import StartupClock


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    from launcher.rank import format_summary, run_rank
    from launcher.trainer import CheckpointExchange

    if Path(config["cwd"]).is_dir():  # Ray starts workers in its own directory; user code lives in the launcher's
        os.chdir(config["cwd"])
    rank = ray.train.get_context().get_world_rank()
    spec_path = Path(config["spec_path"])
    with rank_console(Path(config["console_dir"]), rank):  # the launcher relays these files to its console
        reported = ray.train.get_checkpoint()
        with reported.as_directory() if reported else contextlib.nullcontext() as restored:
            exchange = CheckpointExchange(restored=Path(restored) if restored else None, published=report_checkpoint)
            summary = run_rank(spec_path, StartupClock(config["launched_at"]), exchange)
        ray.train.report({"step": summary["steps"], "final_loss": summary["final_loss"]})  # every rank, as Ray expects
        if rank == 0:
            print(format_summary(summary), flush=True)


def report_checkpoint(step: int, directory: Path) -> None:
    """Called on every rank once checkpoint `step` is complete. Only rank 0 hands Ray the directory:
    it is on storage every rank writes to, and already holds every rank's shards."""
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(str(directory))
    ray.train.report({"step": step}, checkpoint=checkpoint if ray.train.get_context().get_world_rank() == 0 else None,
                     checkpoint_dir_name=directory.name, delete_local_checkpoint_after_upload=False)


def loopback_stores() -> None:
    """Setup hook of every worker of the embedded Ray (runtime_env worker_process_setup_hook).

    Ray Train's rank 0 hosts the process group's TCPStore at MASTER_ADDR (the node address,
    127.0.0.1 for the embedded Ray), and torch binds it to every interface: bind it to loopback
    instead (launcher.executors.agent.loopback_store), without importing torch into workers that
    never use it.
    """
    from launcher.executors.agent import loopback_store, patch_after_import

    patch_after_import("torch.distributed.rendezvous", lambda module: setattr(module, "TCPStore", loopback_store))
