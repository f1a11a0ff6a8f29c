"""Ray executor: Ray Train's TorchTrainer starts one worker per rank, each running `launcher.rank.run_rank`.

- ScalingConfig from the plan (one worker per rank, 1 CPU each, a GPU each on cuda),
  TorchConfig(backend gloo/nccl, timeout = training.collective_timeout_s),
  RunConfig(storage under the run directory, FailureConfig(max_failures = resources.max_restarts)).
- Address: `--address`, else RAY_ADDRESS (set inside a Ray job), else an embedded local Ray that
  this launcher starts and shuts down; a cluster it joined is left alone.
- The embedded Ray listens on loopback only (measured with ray 2.60, every listening socket of the
  launch's process tree): its node address is 127.0.0.1 and it has no dashboard. ray.init turns a
  loopback `_node_ip_address` into the machine's routable address (ray._private.services.
  resolve_ip_for_localhost); start_ray keeps it loopback, and then gcs_server, raylet, the dashboard
  and runtime-env agents, the driver and the workers listen on 127.0.0.1 (without that: gcs_server,
  raylet and the workers on every interface, the agents on the routable address). Ray Train's rank 0
  hosts the process group's TCPStore, which torch binds to every interface: a worker setup hook
  (ray_rank.loopback_stores) binds it to 127.0.0.1. If a Ray version drops resolve_ip_for_localhost,
  the embedded Ray listens as Ray chooses; RAY_ADDRESS naming a head you started is the alternative.
  A joined cluster (`--address`, RAY_ADDRESS) listens as it was started.
- Token authentication stays on: RAY_AUTH_MODE=token unless the caller chose a mode.
- Checkpoints: each complete checkpoint is reported to Ray (copied into RunConfig's storage, the
  newest `checkpoint.keep` kept); Ray restarts the whole worker group and hands it the newest one
  it registered, which every rank resumes from unless the run directory holds a newer one
  (launcher.trainer.resume_path). The run directory must be shared storage on a multi-node cluster,
  as Ray Train's storage_path must be anyway.
- Cleanup: ray.shutdown() gives the raylet 1 s to stop its workers and agents, then SIGKILLs it; on
  a busy machine that orphans them, and its agents only notice ~2 s later (5 checks of their parent,
  0.4 s apart). So the launcher is their subreaper while it runs and, after the shutdown, stops every
  process of this launch still below it (launcher.procs.end_launch): the launch leaves nothing running.
- Console: the same lines as a local launch, each once, uncoloured; Ray's own output goes to
  `<run>/logs/ray.log` (launcher.executors.ray_output).
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from launcher.errors import LaunchError
from launcher.executors.ray_output import WORKER_ENV, ConsoleRelay, RayLog
from launcher.executors.request import Job, LaunchOptions, LaunchRequest
from launcher.procs import adopt_orphans, end_launch, launch_token
from launcher.rundir import RunDir

TRAIN_LOOP = "launcher.executors.ray_rank:train_loop_per_worker"
LOOPBACK_HOOK = "launcher.executors.ray_rank.loopback_stores"  # Ray Train rank 0's TCPStore on 127.0.0.1


def ray_address(options: LaunchOptions) -> str | None:
    return options.address or os.environ.get("RAY_ADDRESS") or None


class RayExecutor:
    name = "ray"

    def dry_run(self, job: Job, options: LaunchOptions) -> LaunchRequest:
        plan = job.plan
        address = ray_address(options)
        cpus = max(os.cpu_count() or 1, plan.world_size)
        settings: dict[str, Any] = {
            "ray.init": ({"address": address} if address else
                         {"address": "local", "_node_ip_address": "127.0.0.1", "include_dashboard": False,
                          "num_cpus": cpus, "runtime_env": {"worker_process_setup_hook": LOOPBACK_HOOK}}),
            "ray.shutdown": "no (a cluster this launcher joined)" if address else "yes, after the run (embedded Ray)",
            "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token"),
            "environment": WORKER_ENV,
            "ray_log": str(RunDir(job.run_dir).ray_log),
            "train_loop_per_worker": TRAIN_LOOP,
            "train_loop_config": {"spec_path": str(job.spec_path), "cwd": os.getcwd(),
                                  "console_dir": str(RunDir(job.run_dir).consoles)},
            "ScalingConfig": {"num_workers": plan.world_size, "use_gpu": plan.device == "cuda",
                              "resources_per_worker": {"CPU": 1, **({"GPU": 1} if plan.device == "cuda" else {})}},
            "TorchConfig": {"backend": plan.backend, "timeout_s": int(job.hang_timeout_s)},
            "RunConfig": {"name": job.name, "storage_path": str(RunDir(job.run_dir).ray_storage),
                          # read by glibc when a worker starts (launcher/allocator.py)
                          "worker_runtime_env": {"env_vars": plan.allocator_env}},
            "CheckpointConfig": {"num_to_keep": job.checkpoints_kept},
            "FailureConfig": {"max_failures": job.max_restarts},
        }
        return LaunchRequest(executor=self.name, settings=settings,
                             files={str(job.spec_path): "resolved job spec (JSON), read by every rank"},
                             marker=str(job.spec_path), heartbeat_dir=str(RunDir(job.run_dir).heartbeats),
                             world_size=plan.world_size, hang_timeout_s=job.hang_timeout_s)

    def run(self, request: LaunchRequest) -> None:
        s = request.settings
        os.environ.setdefault("RAY_AUTH_MODE", s["RAY_AUTH_MODE"])  # before ray is imported
        os.environ.update(s["environment"])  # Ray Train hands these on to its controller and workers
        import ray
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from launcher.executors.ray_rank import train_loop_per_worker

        failed = f"the Ray Train job failed (Ray's own output: {s['ray_log']})"
        adopted = adopt_orphans(True)  # what a raylet killed at shutdown leaves running stays below us
        try:
            with RayLog(Path(s["ray_log"])) as ray_log, ConsoleRelay(Path(s["train_loop_config"]["console_dir"])):
                started_here = start_ray(s["ray.init"])
                ray_log.capture_relayed()
                try:
                    trainer = TorchTrainer(
                        train_loop_per_worker,
                        train_loop_config={**s["train_loop_config"], "launched_at": _launched_at()},
                        scaling_config=ScalingConfig(**s["ScalingConfig"]),
                        torch_config=TorchConfig(**s["TorchConfig"]),
                        run_config=RunConfig(**s["RunConfig"],
                                             checkpoint_config=CheckpointConfig(**s["CheckpointConfig"]),
                                             failure_config=FailureConfig(**s["FailureConfig"])),
                    )
                    result = trainer.fit()
                except Exception as exc:  # Ray raises its TrainingFailedError family; keep Ray's types out of the CLI
                    raise LaunchError(failed, ray_failures(exc)) from None
                finally:
                    if started_here:
                        ray.shutdown()
        finally:
            end_launch(launch_token())
            if adopted:
                adopt_orphans(False)
        if result.error is not None:
            raise LaunchError(failed, ray_failures(result.error))


def start_ray(init: dict[str, Any]) -> bool:
    """Join or start Ray as the dry run says; True when this process started it (and must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    with _loopback_node(init.get("_node_ip_address")):
        ray.init(**init)
    return init["address"] == "local"  # 'local' always starts a new Ray, never an unrelated one found on the machine


@contextlib.contextmanager
def _loopback_node(address: str | None) -> Iterator[None]:
    """Let ray.init keep a loopback node address (it replaces one with the machine's routable address)."""
    from ray._private import services

    original = getattr(services, "resolve_ip_for_localhost", None)
    if address is None or original is None:
        yield
        return
    services.resolve_ip_for_localhost = lambda host: host if host == address else original(host)
    try:
        yield
    finally:
        services.resolve_ip_for_localhost = original


def ray_failures(exc: BaseException) -> dict[int, str]:
    """rank -> error, from Ray's worker-group error when it has one."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        return {int(rank): _last_line(err) for rank, err in sorted(failures.items())}
    return {0: _last_line(exc)}


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def _launched_at() -> float:
    from launcher.startup import LAUNCHED_AT_ENV

    return float(os.environ.get(LAUNCHED_AT_ENV) or time.time())
