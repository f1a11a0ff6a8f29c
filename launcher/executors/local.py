"""Local executor: torch's elastic agent (torchrun) on this machine.

One node: standalone rendezvous on a free port. Several nodes (`--nnodes N --node-rank R
--rdzv-endpoint HOST:PORT`): one launcher per node, all meeting at a c10d rendezvous; every node's
run directory must be the same shared directory (checkpoints are written by all ranks).
"""
from __future__ import annotations

import os
import sys

from launcher.errors import UserError
from launcher.executors.process import run_process_tree
from launcher.executors.request import Job, LaunchOptions, LaunchRequest
from launcher.heartbeat import HEARTBEAT_DIR


def worker_command(job: Job, options: LaunchOptions) -> tuple[tuple[str, ...], str]:
    """The per-rank entry point and the marker that finds this node's processes.

    With several launchers on one machine (a multi-node test) each node's processes carry their
    own node rank, so one launcher's cleanup never reaches another's ranks.
    """
    argv: tuple[str, ...] = ("-m", "launcher.worker", str(job.spec_path))
    if job.plan.nodes == 1:
        return argv, str(job.spec_path)
    # Not an option ("--node"): torchrun's parser would try to match it against its own options.
    return (*argv, f"node={options.node_rank}"), f"{job.spec_path} node={options.node_rank}"


def rendezvous_args(job: Job, options: LaunchOptions) -> tuple[str, ...]:
    if job.plan.nodes == 1:
        return ("--standalone", "--nnodes=1")
    if not options.rdzv_endpoint:
        raise UserError(f"resources.nodes={job.plan.nodes}: a multi-node launch needs --rdzv-endpoint HOST:PORT"
                        " (the c10d rendezvous every node's launcher joins)")
    if not 0 <= options.node_rank < job.plan.nodes:
        raise UserError(f"--node-rank {options.node_rank}: allowed 0..{job.plan.nodes - 1}")
    return (f"--nnodes={job.plan.nodes}", f"--node-rank={options.node_rank}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={options.rdzv_endpoint}", f"--rdzv-id={job.name}")


def rank_threads(procs_per_node: int) -> dict[str, str]:
    """torchrun would set 1 thread per rank with a warning; say it explicitly instead."""
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // procs_per_node)), "PYTHONUNBUFFERED": "1"}


class LocalExecutor:
    name = "local"

    def dry_run(self, job: Job, options: LaunchOptions) -> LaunchRequest:
        worker, marker = worker_command(job, options)
        argv = (
            sys.executable, "-m", "torch.distributed.run", *rendezvous_args(job, options),
            f"--nproc-per-node={job.plan.procs_per_node}", f"--max-restarts={job.max_restarts}",
            "--monitor-interval=0.5", f"--log-dir={job.run_dir / 'logs'}", *worker,
        )
        files = {str(job.spec_path): "resolved job spec (JSON), read by every rank"}
        return LaunchRequest(executor=self.name, argv=argv, env=rank_threads(job.plan.procs_per_node), files=files,
                             marker=marker, log_dir=str(job.run_dir / "logs"),
                             heartbeat_dir=str(job.run_dir / HEARTBEAT_DIR), world_size=job.plan.world_size,
                             hang_timeout_s=job.hang_timeout_s)

    def run(self, request: LaunchRequest) -> None:
        run_process_tree(request)
