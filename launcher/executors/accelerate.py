"""Accelerate executor: the real `accelerate launch` CLI, used only as a process starter.

The config file is generated from the plan (or the user's own, `--accelerate-config`, checked
first); the strategy stays ours, so a config that asks Accelerate for FSDP, DeepSpeed or another
sharding is refused. On CPU, `accelerate launch` takes the multi-process path only with
`distributed_type: MULTI_GPU` plus ACCELERATE_USE_CPU=1 (-> MULTI_CPU over gloo); `--cpu`,
`use_cpu: true` and `distributed_type: MULTI_CPU` silently start ONE process. Whatever happens,
every rank checks the world size it was started into against the plan (launcher.worker).
One node: the static rendezvous store on 127.0.0.1 and a free port, bound to loopback by the
launcher's fork (launcher/executors/agent.py), collectives on `lo`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from launcher.errors import UserError
from launcher.executors.local import loopback_collectives, rank_redirects, rank_threads, worker_command
from launcher.executors.process import run_process_tree
from launcher.executors.request import Job, LaunchOptions, LaunchRequest
from launcher.rundir import RunDir

# Distributed types that are a plain process starter; the others would shard or wrap the model.
STARTERS = {"MULTI_GPU", "NO"}


def generated_config(job: Job, machine_rank: int) -> dict:
    plan = job.plan
    return {
        "compute_environment": "LOCAL_MACHINE",
        # MULTI_GPU = accelerate's torchrun path; on CPU, ACCELERATE_USE_CPU=1 turns it into MULTI_CPU
        "distributed_type": "MULTI_GPU" if plan.world_size > 1 else "NO",
        "num_processes": plan.world_size,
        "num_machines": plan.nodes,
        "machine_rank": machine_rank,
        "mixed_precision": "no",  # precision is the spec's training.precision, applied by our strategy
        "use_cpu": False,  # True would take accelerate's single-process path
        "gpu_ids": "all",
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
        "downcast_bf16": "no",
        "enable_cpu_affinity": False,
        "dynamo_config": {"dynamo_backend": "NO"},
    }


def check_user_config(path: str) -> None:
    """Refuse configs that would change the strategy or the number of processes behind our back."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--accelerate-config {path}: file not found")
    raw = yaml.safe_load(file.read_text()) or {}
    if not isinstance(raw, dict):
        raise UserError(f"--accelerate-config {path}: expected a YAML mapping (accelerate config)")
    kind = str(raw.get("distributed_type", "NO"))
    if kind not in STARTERS:
        hint = (" (on CPU it starts ONE process; use MULTI_GPU, meshyard sets ACCELERATE_USE_CPU=1)"
                if kind == "MULTI_CPU" else " (the strategy comes from the job spec's strategy section)")
        raise UserError(f"--accelerate-config {path}: distributed_type {kind} is not allowed{hint};"
                        f" allowed: {', '.join(sorted(STARTERS))}")
    if raw.get("use_cpu"):
        raise UserError(f"--accelerate-config {path}: use_cpu: true starts a single process; remove it"
                        " (meshyard sets ACCELERATE_USE_CPU=1 when the plan's device is cpu)")


class AccelerateExecutor:
    name = "accelerate"

    def dry_run(self, job: Job, options: LaunchOptions) -> LaunchRequest:
        plan = job.plan
        generated: dict[str, str] = {}
        if options.accelerate_config:
            check_user_config(options.accelerate_config)
            config_path = str(Path(options.accelerate_config).resolve())
        else:
            config_path = str(RunDir(job.run_dir).accelerate_config)
            generated[config_path] = yaml.safe_dump(generated_config(job, options.node_rank), sort_keys=False)
        worker, marker = worker_command(job, options)
        # The process counts are passed as flags too: they win over any config file.
        argv: tuple[str, ...] = (
            sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", config_path,
            "--num_processes", str(plan.world_size), "--num_machines", str(plan.nodes),
            "--machine_rank", str(options.node_rank), "--max_restarts", str(job.max_restarts),
            "--monitor_interval", "0.5", "--log_dir", str(RunDir(job.run_dir).logs),
        )
        if plan.nodes > 1:
            if not options.rdzv_endpoint:
                raise UserError(f"resources.nodes={plan.nodes}: a multi-node launch needs --rdzv-endpoint HOST:PORT")
            host, _, port = options.rdzv_endpoint.rpartition(":")
            argv += ("--main_process_ip", host, "--main_process_port", port)
        else:  # a free port (29500 would collide with another run), on 127.0.0.1 (torchrun's default address)
            argv += ("--main_process_port", "0")
        argv += worker
        # torchrun's --redirects (not an `accelerate launch` option: its torchrun parser reads PET_REDIRECTS)
        env = {**rank_threads(plan.threads_per_rank), **plan.allocator_env, **loopback_collectives(plan.nodes),
               "PET_REDIRECTS": rank_redirects(plan.procs_per_node)}
        if plan.device == "cpu":
            env["ACCELERATE_USE_CPU"] = "1"
        files = {str(job.spec_path): "resolved job spec (JSON), read by every rank",
                 config_path: "accelerate config (" + ("yours" if options.accelerate_config else "generated") + ")"}
        return LaunchRequest(executor=self.name, argv=argv, env=env, files=files, generated=generated, marker=marker,
                             log_dir=str(RunDir(job.run_dir).logs), heartbeat_dir=str(RunDir(job.run_dir).heartbeats),
                             world_size=plan.world_size, hang_timeout_s=job.hang_timeout_s)

    def run(self, request: LaunchRequest) -> None:
        run_process_tree(request)
