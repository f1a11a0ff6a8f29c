"""Local executor: torch's elastic agent (torchrun) on this machine.

One node: a c10d rendezvous on 127.0.0.1 (port 0: the agent's store takes a free port itself, so
there is no window between picking and binding it), the agent's address 127.0.0.1 (MASTER_ADDR)
and gloo/NCCL on the loopback interface; the launcher's fork binds those stores to 127.0.0.1
(launcher/executors/agent.py), so nothing of a single-node run listens beyond this machine.
(torchrun's `--standalone` is the same rendezvous on `localhost:0`, listening on every interface.)
Several nodes (`--nnodes N --node-rank R
--rdzv-endpoint HOST:PORT`): one launcher per node, all meeting at a c10d rendezvous; every node's
run directory must be the same shared directory (checkpoints are written by all ranks).
"""
from __future__ import annotations

import sys

from launcher.errors import UserError
from launcher.executors.process import run_process_tree
from launcher.executors.request import Job, LaunchOptions, LaunchRequest
from launcher.rundir import RunDir

LOOPBACK = "127.0.0.1"
SHUTDOWN_TIMEOUT_S = 10  # SIGTERM -> SIGKILL of the ranks when the agent stops (default 30)


def worker_command(job: Job, options: LaunchOptions) -> tuple[tuple[str, ...], str]:
    """The per-rank entry point and the run (and node) it names, for people reading `ps`.

    Processes are never found by their command line: a launcher's cleanup finds its own by launch
    token and descent (launcher/procs.py), so launchers of several nodes on one machine, or a
    user's `tail -f <run>/spec.json`, are never touched.
    """
    argv: tuple[str, ...] = ("-m", "launcher.worker", str(job.spec_path))
    if job.plan.nodes == 1:
        return argv, str(job.spec_path)
    # Not an option ("--node"): torchrun's parser would try to match it against its own options.
    return (*argv, f"node={options.node_rank}"), f"{job.spec_path} node={options.node_rank}"


def rendezvous_args(job: Job, options: LaunchOptions) -> tuple[str, ...]:
    if job.plan.nodes == 1:
        return ("--nnodes=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={LOOPBACK}:0", f"--rdzv-id={job.name}",
                f"--local-addr={LOOPBACK}")
    if not options.rdzv_endpoint:
        raise UserError(f"resources.nodes={job.plan.nodes}: a multi-node launch needs --rdzv-endpoint HOST:PORT"
                        " (the c10d rendezvous every node's launcher joins)")
    if not 0 <= options.node_rank < job.plan.nodes:
        raise UserError(f"--node-rank {options.node_rank}: allowed 0..{job.plan.nodes - 1}")
    return (f"--nnodes={job.plan.nodes}", f"--node-rank={options.node_rank}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={options.rdzv_endpoint}", f"--rdzv-id={job.name}")


def rank_threads(threads_per_rank: int) -> dict[str, str]:
    """torchrun would set 1 thread per rank with a warning; the plan's choice (the user's
    OMP_NUM_THREADS, else cores / local processes) instead."""
    return {"OMP_NUM_THREADS": str(threads_per_rank), "PYTHONUNBUFFERED": "1"}


def rank_redirects(procs_per_node: int) -> str:
    """torchrun's --redirects, per local rank: local rank 0's stdout (the step, resumed-from and done
    lines) stays on the console; its stderr and all output of the other ranks go to
    <log-dir>/<run id>/attempt_N/<local rank>/{stdout,stderr}.log. A failing rank's traceback (and
    its peers') is then in those files, and the console shows the launcher's summary of it."""
    return ",".join(f"{rank}:{2 if rank == 0 else 3}" for rank in range(procs_per_node))


def loopback_collectives(nodes: int) -> dict[str, str]:
    """One node: the ranks' gloo/NCCL sockets on the loopback interface (by default gloo binds the
    address the host name resolves to, which may be a public one)."""
    return {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"} if nodes == 1 else {}


class LocalExecutor:
    name = "local"

    def dry_run(self, job: Job, options: LaunchOptions) -> LaunchRequest:
        worker, marker = worker_command(job, options)
        # Nodes sharing one run directory (one file system) must not read each other's attempts.
        logs = RunDir(job.run_dir).logs / (f"node{options.node_rank}" if job.plan.nodes > 1 else "")
        argv = (
            sys.executable, "-m", "torch.distributed.run", *rendezvous_args(job, options),
            f"--nproc-per-node={job.plan.procs_per_node}", f"--max-restarts={job.max_restarts}",
            "--monitor-interval=0.5", f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}",
            f"--log-dir={logs}", f"--redirects={rank_redirects(job.plan.procs_per_node)}",
            *worker,
        )
        files = {str(job.spec_path): "resolved job spec (JSON), read by every rank"}
        return LaunchRequest(executor=self.name, argv=argv, files=files,
                             env={**rank_threads(job.plan.threads_per_rank), **job.plan.allocator_env,
                                  **loopback_collectives(job.plan.nodes)},
                             marker=marker, log_dir=str(logs),
                             heartbeat_dir=str(RunDir(job.run_dir).heartbeats), world_size=job.plan.world_size,
                             hang_timeout_s=job.hang_timeout_s)

    def run(self, request: LaunchRequest) -> None:
        run_process_tree(request)
