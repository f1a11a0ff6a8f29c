"""What each Ray Train worker runs: the same per-rank code as every other executor.

Ray's torch backend has already set torchrun's environment contract (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and formed the process group; `run_rank` checks the world
size against the plan and trains. A restarted worker group (FailureConfig) calls this again, and
the trainer resumes from the newest complete checkpoint in the run directory (checkpoint.resume:
auto), which is also the checkpoint reported to Ray.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from launcher.startup import StartupClock


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    from launcher.worker import format_summary, run_rank

    if Path(config["cwd"]).is_dir():  # Ray starts workers in its own directory; user code lives in the launcher's
        os.chdir(config["cwd"])
    summary = run_rank(Path(config["spec_path"]), StartupClock(config["launched_at"]))
    checkpoint = summary.get("checkpoint")
    # Every rank reports (Ray Train expects it); only rank 0 names the checkpoint, by reference:
    # our DCP checkpoint is already complete on shared storage, so Ray need not copy it.
    ray.train.report({"step": summary["steps"], "final_loss": summary["final_loss"],
                      "checkpoint_dir": checkpoint if ray.train.get_context().get_world_rank() == 0 else None})
    if ray.train.get_context().get_world_rank() == 0:
        print(format_summary(summary), flush=True)
