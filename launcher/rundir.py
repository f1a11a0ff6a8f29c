"""The run directory `<output.dir>/<name>/`: the one place that knows what lives where in it.

docs/checkpoints.md describes the same layout for users. Checkpoint directories inside
`checkpoints/` are launcher/checkpoint.py's business; lock files are launcher/runlock.py's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def spec(self) -> Path:
        """The resolved spec every rank reads (executors hand ranks this file, never env vars)."""
        return self.path / "spec.json"

    @property
    def plan(self) -> Path:
        """The launcher's plan: ranks run it instead of planning again."""
        return self.path / "plan.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def preempted(self) -> Path:
        """Written when a launch stopped for SIGTERM: the step and its checkpoint."""
        return self.path / "preempted.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def logs(self) -> Path:
        """torchrun's per-attempt error files (what the failure report is built from); Ray's log."""
        return self.path / "logs"

    @property
    def ray_log(self) -> Path:
        """Ray's own output (ray executor): its driver-side log and what its processes print,
        other than the ranks' console lines."""
        return self.logs / "ray.log"

    @property
    def consoles(self) -> Path:
        """Each rank's stdout and stderr under Ray, which the launcher relays to its own (ray executor)."""
        return self.logs / "console"

    @property
    def heartbeats(self) -> Path:
        return self.path / "heartbeats"

    @property
    def export(self) -> Path:
        return self.path / "export"

    @property
    def quantized(self) -> Path:
        return self.path / "quantized"

    @property
    def ray_storage(self) -> Path:
        """Ray Train's RunConfig storage (ray executor)."""
        return self.path / "ray"

    @property
    def accelerate_config(self) -> Path:
        """The generated accelerate config (accelerate executor)."""
        return self.path / "accelerate_config.yaml"

    def prune_report(self, rank: int) -> Path:
        return self.path / f"prune_rank{rank}.json"

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> RunDir:
        """The run a checkpoint directory (`<run>/checkpoints/step_*`) belongs to."""
        return cls(checkpoint.parent.parent)
