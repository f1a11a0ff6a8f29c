"""What an executor would do, as data: the dry run that `meshyard plan` prints and tests assert on.

An executor turns a `Job` (what the plan says) plus `LaunchOptions` (where: command-line flags or a
cluster config) into a `LaunchRequest`. Building the request is pure; `executor.run(request)` is the
only step with side effects (it writes the generated files, then starts the processes).
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports this module; torch (via the plan) only when a command needs it
    from launcher.plan import Plan


@dataclass(frozen=True)
class Job:
    """The parts of the spec and plan that decide how processes start."""

    name: str
    spec_path: Path  # <run_dir>/spec.json, the resolved spec every rank reads
    plan: Plan
    max_restarts: int
    hang_timeout_s: float
    checkpoints_kept: int  # checkpoint.keep: an orchestrator's own checkpoint storage keeps as many (Ray)

    @property
    def run_dir(self) -> Path:
        return self.spec_path.parent


@dataclass(frozen=True)
class LaunchOptions:
    """Where the job runs. Each executor reads the fields that concern it and ignores the rest."""

    executor: str = "local"
    node_rank: int = 0  # local: this launcher's node (multi-node)
    rdzv_endpoint: str | None = None  # local: HOST:PORT of the c10d rendezvous (multi-node)
    address: str | None = None  # ray: an existing cluster (else RAY_ADDRESS, else an embedded local Ray)
    accelerate_config: str | None = None  # accelerate: the user's config file instead of a generated one


@dataclass(frozen=True)
class LaunchRequest:
    executor: str
    argv: tuple[str, ...] = ()  # the command, for executors that start a process tree
    env: dict[str, str] = field(default_factory=dict)  # set on top of the caller's environment
    settings: dict[str, Any] = field(default_factory=dict)  # everything else the executor passes (Ray's configs)
    files: dict[str, str] = field(default_factory=dict)  # path -> what it is
    generated: dict[str, str] = field(default_factory=dict)  # path -> content, written by run()
    marker: str = ""  # the run (and node) as the ranks' command lines name it; never used to find processes
    #                   (that is the launch token plus descent from the launcher, launcher/procs.py)
    log_dir: str = ""  # where the ranks' error files land
    heartbeat_dir: str = ""  # where the ranks' heartbeat files land
    world_size: int = 1
    hang_timeout_s: float = 300.0  # no progress by any rank for this long = a hang

    def render(self) -> str:
        lines = []
        if self.argv:
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
            command = " ".join(shlex.quote(a) for a in self.argv)
            lines.append(f"{env} \\\n  {command}" if env else command)
        lines += [f"  {key}: {value}" for key, value in self.settings.items()]
        lines += [f"  file {path}: {role}" for path, role in self.files.items()]
        for path, content in self.generated.items():
            lines.append(f"  generated {path}:")
            lines += [f"    {line}" for line in content.splitlines()]
        return "\n".join(lines)

    def headline(self) -> str:
        """One line for the launch log: the command, or the first setting."""
        if self.argv:
            return " ".join(self.argv)
        return next((f"{key}: {value}" for key, value in self.settings.items()), self.executor)

    def write_generated(self) -> None:
        for path, content in self.generated.items():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(content)
